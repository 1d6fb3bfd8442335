"""stap interaction that needs no kernel: probe-resolution parsing on recorded
`stap -p2` output, error diagnosis, the module cache."""
import pytest

from tcpipstat.counters import all_points, select
from tcpipstat.render import resolve_points, stap_point, stap_spellings
from tcpipstat.stap import diagnose, parse_resolved, unloaded_modules

from .conftest import FIXTURES


# the lab kernels the probe checks were recorded on (lab.sh stap -p2)
RECORDED_ON = {"bookworm": "6.1.0-50-cloud-amd64", "trixie": "6.12.117+deb13-cloud-amd64"}


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_parse_resolved_on_recorded_pass2(suite):
    text = (FIXTURES / f"{suite}-probe-check.p2").read_text()
    points = [stap_point(p) for p in all_points()]
    resolved = parse_resolved(text, points)
    assert 'kernel.function("tcp_v4_rcv")' in resolved
    assert 'kernel.function("tcp_sendmsg").return' in resolved
    # a point the kernel lacks is not reported as resolved
    assert parse_resolved(text, points + ['kernel.function("no_such_function")']) == resolved
    # the cong group's tracepoint: bookworm's stap 4.8 resolves it, trixie's 5.1 does not
    # (there the kprobe fallback's points are what resolves)
    assert ('kernel.trace("tcp:tcp_cong_state_set")' in resolved) == (suite == "bookworm")
    assert 'kernel.function("tcp_ack").return' in resolved


@pytest.mark.parametrize("suite", ["bookworm", "trixie"])
def test_a_compressed_modules_functions_resolve_by_its_debug_file(suite):
    """trixie's stap 5.1 finds the tls module's functions by name in its symbol table only
    (tls.ko.xz), and with their debug information by the debug file's path."""
    kver = RECORDED_ON[suite]
    text = (FIXTURES / f"{suite}-probe-check.p2").read_text()
    tls = [p for p in all_points() if p.module == "tls"]
    by_name, by_file = zip(*(stap_spellings(p, kver) for p in tls))
    resolved = parse_resolved(text, list(by_name + by_file))
    # tls_sw_sendpage() went with tcp_sendpage() in Linux 6.5
    present = {p.target for p in tls} - ({"tls_sw_sendpage"} if suite == "trixie" else set())
    assert {p.target for p, t in zip(tls, by_file) if t in resolved} == present
    assert bool(set(by_name) & resolved) == (suite == "bookworm")
    sel = select(("socket",), resolved=resolve_points(_Recorded(text), all_points(), kver))
    assert {u.name for u in sel.units} >= {"tls_sendmsg", "tls_recvmsg", "tls_splice_read"}


class _Recorded:
    """A toolchain whose probe check answers with a recorded pass 2."""
    def __init__(self, text: str):
        self.text = text

    def resolve(self, points, kver, script):
        return parse_resolved(self.text, points)


def test_unloaded_modules_are_named(tmp_path):
    sel = select(("socket",))
    assert unloaded_modules(sel, tmp_path) == ["tls"]
    (tmp_path / "tls").mkdir()
    assert unloaded_modules(sel, tmp_path) == []
    assert unloaded_modules(select(("tcp",)), tmp_path / "none") == []


def test_parse_resolved_only_reads_the_probes_section():
    text = ('# globals\nkernel.function("tcp_v4_rcv") junk\n# probes\n'
            'kernel.function("ip_rcv@net/ipv4/ip_input.c:560")? /* pc=_stext+0x1 */\n'
            '# functions\n')
    assert parse_resolved(text, ['kernel.function("tcp_v4_rcv")', 'kernel.function("ip_rcv")']) == \
        frozenset({'kernel.function("ip_rcv")'})


def test_parse_resolved_reads_module_functions():
    """kTLS's units probe the tls module: stap -p2 (bookworm's, as it wrote them) names
    the module's functions as module("tls").function(...)."""
    text = ('# probes\nmodule("tls").function("tls_sw_sendmsg@net/tls/tls_sw.c:1016").return? '
            '/* pc=<tls:tls_sw_sendmsg+0> */ /* <- module("tls").function("tls_sw_sendmsg@net/'
            'tls/tls_sw.c:1016").return? */\n')
    points = ['module("tls").function("tls_sw_sendmsg").return',
              'module("tls").function("tls_sw_recvmsg").return',
              'kernel.function("tls_sw_sendmsg").return']
    assert parse_resolved(text, points) == frozenset(points[:1])
    # trixie's stap 5.1 finds no debug information for the compressed tls.ko.xz: the symbol
    # table resolves the point, but $return and $sk would not compile
    symbols_only = ('# probes\nmodule("tls").function("tls_sw_sendmsg").return? /* pc=<tls:'
                    'tls_sw_sendmsg+0> */ /*  <- module("tls").function("tls_sw_sendmsg").return? '
                    '*/\n')
    assert parse_resolved(symbols_only, points) == frozenset()


@pytest.mark.parametrize("stderr,what", [
    ("semantic error: missing x86_64 kernel/module debuginfo [man warning::debuginfo] under "
     "'/lib/modules/6.1.0/build'", "debug information"),
    ('Checking "/lib/modules/6.1.0-50-cloud-amd64/build/.config" failed with error: No such file '
     'or directory', "headers"),
    ("ERROR: probe overhead (555608199 cycles) exceeded threshold (500000000 cycles), rate (1111) "
     "exceeded threshold", "overhead guard"),
    ("ERROR: Couldn't insert module '/tmp/x.ko': Operation not permitted", "refused to load"),
])
def test_diagnose_gives_the_fix(stderr, what):
    d = diagnose(stderr)
    assert d is not None and what in d[0] and d[1]


def test_unknown_stderr_is_not_diagnosed():
    assert diagnose("something else entirely") is None


def test_a_compiler_error_quoting_the_guard_is_not_the_guard():
    # gcc's complaint about a -DSTP_OVERLOAD_THRESHOLD without an LL suffix, as stap -p4
    # printed it in the lab: it quotes the runtime's message, with no numbers in it
    stderr = ('/tmp/stappAtyPT/ttx_src.c:55277:76: error: format \u2018%lld\u2019 expects '
              'argument of type \u2018long long int\u2019, but argument 3 has type \u2018int\u2019 '
              '[-Werror=format=]\n'
              '55277 |           _stp_error ("probe overhead (%lld cycles) exceeded threshold '
              '(%lld cycles) in last %lld cycles", (long long) c->cycles_sum, '
              'STP_OVERLOAD_THRESHOLD, STP_OVERLOAD_INTERVAL);\n')
    assert diagnose(stderr) is None
