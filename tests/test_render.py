import itertools
import re
from pathlib import Path

from hypothesis import given, settings, strategies as st

from tcpipstat.counters import (CA_TIME_COUNTERS, DEFAULT_GROUPS, GROUPS, UNITS, all_points,
                                counters_for_units, points_for_groups, select, tracepoint)
from tcpipstat.plan import build_plan
from tcpipstat.render import (_env, module_args, probe_check_points, render_probe_check,
                              render_script, resolve_points, stap_point, stap_spellings)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "tcpipstat" / "stp_templates"
CONG_TP = tracepoint("tcp:tcp_cong_state_set")


def named(*names):
    """The selection on a kernel where exactly the points of the units ``names`` exist."""
    return select(GROUPS, resolved={p for u in UNITS if u.name in names for p in u.points})


def unit_names(sel):
    return [u.name for u in sel.units]


def test_every_unit_renders_its_points():
    for u in UNITS:
        # a secondary unit runs only with a primary unit of its counter
        names = {u.name} | ({n.name for n in UNITS
                             if n.primary and n.counters[:1] == u.counters[:1]}
                            if not u.primary else set())
        sel = named(*names)
        assert u.name in unit_names(sel)
        text = render_script(sel, 1024)
        for p in map(stap_point, u.points):
            assert re.search(r"(^probe|,)\s+" + re.escape(p) + r"[ ,]", text, re.M), (u.name, p)


def test_templates_name_no_probe_point_of_their_own():
    """Probe points come from the catalogue (counters.py), written by render.stap_point;
    the templates only place them."""
    for path in TEMPLATE_DIR.glob("*.j2"):
        src = path.read_text()
        assert not re.search(r'kernel\.(function|trace)\("', src), path.name
        heads = re.findall(r"^probe (\S+)", src, re.M)
        own = ("begin", "end", "timer.ms(10)", 'procfs("finish").write')
        assert all(h.startswith("{{") or h in own for h in heads), (path.name, heads)
        # units are asked their attributes, not tested by name
        assert not re.search(r'"\w+" in units', src), path.name


def test_each_unit_has_a_block_taking_its_points():
    blocks = _env().get_template("units.stp.j2").module
    for u in UNITS:
        assert len(getattr(blocks, u.name).arguments) == len(u.points), u.name


def test_group_combinations_render_distinct_consistent_scripts():
    seen = set()
    for r in range(1, len(GROUPS) + 1):
        for combo in itertools.combinations(GROUPS, r):
            sel = select(combo)
            text = render_script(sel, 8192)
            header = re.search(r'printf\("H\\ttcpipstat.*?\\t8192\\t([A-Za-z,]*)\\n"',
                               text).group(1)
            assert header.split(",") == list(sel.available) == counters_for_units(sel.units)
            for c in sel.available:
                assert f"global tis_c_{c}[8192]" in text
            seen.add(text)
    assert len(seen) == 2 ** len(GROUPS) - 1


def test_a_fallback_only_without_its_preferred_unit():
    everything = set(all_points())
    tp = select(("cong",), resolved=everything)
    kp = select(("cong",), resolved=everything - {CONG_TP})
    assert unit_names(tp) == ["CongState"] and tp.cong == "tracepoint tcp:tcp_cong_state_set"
    assert unit_names(kp) == ["CongStateK"] and kp.cong.startswith("kprobes: tcp_ack")
    assert unit_names(select(("cong",), tracepoints=False, resolved=everything)) == ["CongStateK"]
    # both keep the same counters, so reports do not depend on which one a kernel has
    assert tp.available == kp.available == (
        "CaOpenUs", "CaDisorderUs", "CaCwrUs", "CaRecoveryUs", "CaLossUs", "CaChanges")
    assert not tp.unavailable and not kp.unavailable and select(("tcp",)).cong == ""
    tp, kp = render_script(tp, 1024), render_script(kp, 1024)
    assert 'kernel.trace("tcp:tcp_cong_state_set")' in tp and 'function("tcp_ack")' not in tp
    assert 'function("tcp_ack").return' in kp and "kernel.trace" not in kp


def test_what_a_kernel_lacks_is_unavailable():
    lacking = set(all_points()) - {UNITS[[u.name for u in UNITS].index("DelayedACKs")].points[2]}
    sel = select(DEFAULT_GROUPS, resolved=lacking)
    assert "DelayedACKs" not in unit_names(sel) and sel.unavailable == ("DelayedACKs",)
    assert "DelayedACKs" not in sel.available and "ListenDrops" in sel.available
    # IPv6 coverage alone does not make a counter available
    insegs = UNITS[[u.name for u in UNITS].index("InSegs")]
    sel = select(("tcp",), resolved=set(all_points()) - {insegs.points[0]})
    assert "InSegs6" not in unit_names(sel)
    assert sel.unavailable == ("InSegs",)


def test_the_congestion_time_follows_the_state_order():
    text = render_script(named("CongState"), 1024)
    chain = re.findall(r"if \(s == (\d)\) tis_c_(\w+)\[", text)
    assert chain == [(str(i), c) for i, c in enumerate(CA_TIME_COUNTERS)]


def test_dist_adds_histograms_and_room_for_them():
    plain = render_script(named("CongState"), 1024)
    dist = render_script(named("CongState"), 1024, dist=True)
    assert "tis_cd" not in plain and "tis_cd[" in dist and 'sprintf("\\th.%d.%d=%d"' in dist
    plan = build_plan(["--dist"])
    assert "cong" in plan.groups and "-DMAXSTRINGLEN=4096" in plan.compile_flags()
    assert "-DMAXSTRINGLEN=1024" in build_plan(["--cong"]).compile_flags()


def test_stap_t_keeps_its_report():
    """stap 5.1 compiles the -t report out of a module unless STP_FORCE_STDOUT_TTY is
    defined (tcpipstat compiles with stdout a pipe): --stap-arg=-t defines it."""
    assert "-DSTP_FORCE_STDOUT_TTY" in build_plan(["--stap-arg=-t"]).compile_flags()
    assert "-DSTP_FORCE_STDOUT_TTY" not in build_plan([]).compile_flags()


def test_secondary_units_need_their_primary():
    assert "OutSegsCtl" not in unit_names(named("OutSegsCtl", "InSegs"))
    assert "OutSegsCtl" in unit_names(named("OutSegsCtl", "OutSegs"))


def test_process_attribution_only_with_a_unit_that_tells_it():
    assert select(("socket",)).proc and not select(("ip",)).proc
    assert "tis_p%[" in render_script(select(("socket",)), 1024)
    assert "tis_p%[" not in render_script(select(("ip",)), 1024)


def test_no_tapset_filter_functions_are_used():
    text = render_script(select(GROUPS), 8192)
    assert "filter_key" not in text
    assert "tcpmib." not in text and "ipmib." not in text and "linuxmib." not in text


def test_the_probe_check_asks_only_about_the_groups_chosen():
    default = points_for_groups(DEFAULT_GROUPS)
    # a tracepoint makes stap build a helper module (tens of seconds cold): only with --cong
    assert not any(p.kind == "tracepoint" for p in default)
    assert CONG_TP in points_for_groups(build_plan(["--cong"]).groups)
    assert points_for_groups(GROUPS) == all_points() and set(default) < set(all_points())


def test_probe_check_lists_every_point_optionally():
    text = render_probe_check(probe_check_points(all_points(), "6.12.0-1-amd64"))
    for p in all_points():
        assert f"probe {stap_point(p)} ?" in text
    assert stap_point(CONG_TP) == 'kernel.trace("tcp:tcp_cong_state_set")'
    # a module's function also by its debug file, for stap's search by name misses it
    # where the module is compressed
    dbg = '/usr/lib/debug/lib/modules/6.12.0-1-amd64/kernel/net/tls/tls.ko'
    assert f'probe module("{dbg}").function("tls_sw_recvmsg").return ?' in text


class _Toolchain:
    """stap's answer to a probe check: the points it names (in stap's syntax) resolve."""
    def __init__(self, answer):
        self.answer = answer

    def resolve(self, points, kver, script):
        return frozenset(p for p in points if p in self.answer)


def test_a_module_function_is_spelled_as_it_resolves():
    kver = "6.12.0-1-amd64"
    tls = next(u for u in UNITS if u.name == "tls_recvmsg").points[0]
    by_file = stap_spellings(tls, kver)[1]
    others = [p for p in all_points() if not p.module]
    for answer, spelled in ((stap_spellings(tls, kver), stap_point(tls)),
                            ([by_file], by_file), ([], None)):
        answer = answer + [stap_point(p) for p in others]
        resolved = resolve_points(_Toolchain(answer), [*others, tls], kver)
        assert resolved.get(tls) == spelled
        text = render_script(select(("socket",), resolved=resolved), 1024)
        assert (f"probe {spelled} " in text) == bool(spelled)
        assert ('.function("tls_sw_recvmsg")' in text) == bool(spelled)


_word = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_filter = st.one_of(
    st.builds(lambda a, b, c, d: f"{a}:{b}-{c}:{d}",
              st.sampled_from(["*", "*.*.*.*", "10.0.0.0/8", "127.0.0.1", "[::1]",
                               "[2001:db8::/32]", "1.*.3.*"]),
              st.sampled_from(["*", "80", "0", "65535", "1..1024"]),
              st.sampled_from(["*", "192.168.1.103", "9.*.*.*", "[fe80::/10]"]),
              st.sampled_from(["*", "5201", "22"])),
    _word,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_filter, max_size=5),
       st.sampled_from(["tuple", "laddr", "raddr", "lport", "rport", "x"]),
       st.one_of(st.none(), st.sampled_from(["1", "2.5", "0", "abc", "1e9"]), _word))
def test_no_input_changes_the_script_text(filters, index, timeout):
    argv = [f"index={index}"] + ([f"timeout={timeout}"] if timeout is not None else []) + filters
    if any(w in ("-h", "--help", "--version") for w in argv):
        return  # real options that print and exit
    try:
        plan = build_plan(argv)
    except Exception as e:  # only usage errors may come out of bad input
        assert type(e).__name__ == "UsageError", e
        return
    baseline = render_script(select(plan.groups), plan.max_sockets)
    assert baseline == render_script(select(DEFAULT_GROUPS), 8192)
    for arg in module_args(list(plan.filters), plan.timeout_s):
        # numbers, or a filter's numbers as fixed-width hex: nothing the user typed
        assert re.fullmatch(r"tis_[a-z0-9_]+=-?[0-9]+|tis_f[0-9]+=(?:[0-9a-f]{16}){13}", arg), arg


def test_filters_reach_the_module_as_fixed_width_hex_of_their_64_bit_numbers():
    plan = build_plan(["[fe80::/10]:80..90-[2001:db8::1]:*", "10.1.2.0/24:*-*:22"])
    args = module_args(list(plan.filters), None)
    assert args[0] == "tis_nfilters=2"
    for i, (arg, flt) in enumerate(zip(args[1:], plan.filters)):
        name, _, hexes = arg.partition("=")
        assert name == f"tis_f{i}" and len(hexes) == 13 * 16
        # the script's strtol(substr(s, j * 16, 16), 16) reads back each signed 64-bit slot
        back = [int(hexes[j * 16:(j + 1) * 16], 16) for j in range(13)]
        assert [v - (1 << 64) if v >= 1 << 63 else v for v in back] == list(flt.slots())
    # an IPv6 mask's high half has its top bit set: a negative slot, sent as its 64 bits
    assert any(v < 0 for v in plan.filters[0].slots())


class _AskedToolchain:
    """A toolchain whose probe check resolves every point it is asked about (and remembers them)."""
    def __init__(self):
        self.asked = []

    def resolve(self, points, kver, script):
        self.asked = list(points)
        return frozenset(points)


def test_kprobes_only_takes_the_fallback_where_the_tracepoint_resolves():
    from tcpipstat.stap import dump_script, prepare
    tc = _AskedToolchain()
    script, _, unavailable, how = prepare(build_plan(["-r", "6.1", "--cong"]), tc, lambda m: None)
    assert 'kernel.trace("tcp:tcp_cong_state_set")' in tc.asked and how.startswith("tracepoint")
    plan = build_plan(["-r", "6.1", "--cong", "--kprobes-only"])
    script, _, unavailable, how = prepare(plan, tc, lambda m: None)
    # not even asked (resolving a tracepoint costs stap a helper module), and not used
    assert not any(p.startswith("kernel.trace(") for p in tc.asked), tc.asked
    assert how.startswith("kprobes") and "kernel.trace" not in script
    assert 'function("tcp_ack").return' in script
    assert not unavailable                      # same counters either way
    dumped = dump_script(build_plan(["--cong", "--kprobes-only"]))
    assert "kernel.trace" not in dumped and 'function("tcp_ack").return' in dumped


def test_the_fallback_reads_the_congestion_state_as_a_byte():
    """stap 4.8 reads the icsk_ca_state bitfield as 0 (seen in the lab): the byte that
    holds it is read instead (the low bits of the byte before icsk_retransmits)."""
    kp = render_script(named("CongStateK"), 1024)
    assert "->icsk_ca_state" not in kp and "->icsk_retransmits - 1) & 7" in kp


def test_return_probes_take_entry_values_from_the_kretprobe():
    """@entry() would keep each value in a global map keyed by thread (an extra kprobe and
    two write-locked map operations per call); $param in a .return probe is saved in the
    kretprobe's own data."""
    for sel in (select(GROUPS), select(GROUPS, tracepoints=False)):   # + the fallback
        text = render_script(sel, 8192, dist=True, estats=True, sample=True)
        code = "\n".join(line.split("//")[0] for line in text.splitlines())   # not the comments
        assert ".return" in code and "@entry" not in code


def _probe_body(text, head):
    """The text of the probe or function starting at ``head`` (up to its closing brace)."""
    i = text.index(head)
    depth, j = 0, text.index("{", i)
    while True:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
        j += 1


def test_every_way_a_run_ends_goes_through_one_finish_that_writes_the_trailer_last():
    for kw in [{}, {"estats": True, "sample": True, "dist": True}]:
        text = render_script(select(GROUPS), 1024, **kw)
        fin = _probe_body(text, "function tis_finish(how:long)")
        # the trailer is written in one place, after the last records, once
        assert text.count('printf("T\\t') == 1 and 'printf("T\\t' in fin
        assert fin.index('tis_flush_all("end")') < fin.index('printf("T\\t')
        assert "if (tis_done) return;" in fin
        # Ctrl-C and the -c command's end (the control file), stap's own end, the timeout
        # and --count all finish; only the timer exits, tis_drain_ms after finishing
        assert _probe_body(text, 'probe procfs("finish").write').count("tis_finish(3)") == 1
        assert _probe_body(text, "\nprobe end").count("tis_finish(4)") == 1
        timer = _probe_body(text, "probe timer.ms(10)")
        assert "tis_deadline && now >= tis_deadline) tis_finish(1)" in timer
        assert "tis_nmarks >= tis_count) tis_finish(2)" in timer
        assert text.count("exit()") == 1
        assert "if (gettimeofday_ms() >= tis_done + tis_drain_ms) exit()" in timer
        assert timer.index("if (tis_done)") < timer.index("tis_ticks++")   # nothing else once done
        # records written outside the timer keep quiet after the trailer
        for f in ("function tis_estats(", "function tis_sample("):
            if f in text:
                body = _probe_body(text, f).split("{\n", 1)[1]
                assert body.strip().startswith("if (tis_done) return;")


def test_the_drain_wait_reaches_the_module_as_a_number():
    assert module_args([], None, drain_ms=500) == ["tis_nfilters=0", "tis_drain_ms=500"]
    assert module_args([], None, drain_ms=0) == ["tis_nfilters=0"]


def _call_args(text, start):
    """The arguments of the call whose "(" is at ``start``, split at top-level commas
    (stap string literals, with their escapes, read as one piece)."""
    args, cur, depth, i = [], "", 0, start
    while True:
        ch = text[i]
        if ch == '"':
            end = re.compile(r'"(?:[^"\\]|\\.)*"').match(text, i).end()
            cur, i = cur + text[i:end], end
            continue
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if depth == 0:
            return args + [cur.strip()]
        if ch == "," and depth == 1:
            args, cur = args + [cur.strip()], ""
        elif i > start:
            cur += ch
        i += 1


def test_every_record_is_written_with_its_specs_format_and_as_many_values():
    from tcpipstat.records import SPECS
    text = render_script(select(GROUPS), 8192, dist=True, estats=True, sample=True)
    for spec in SPECS:
        heads = list(re.finditer(r'printf\("' + spec.kind + r'\\t', text))
        assert len(heads) == 1, spec.kind
        args = _call_args(text, heads[0].start() + len("printf"))
        fmt = args[0][1:-1]
        assert len(args) - 1 == len(re.findall(r"%[dxs]", fmt)), (spec.kind, args)
        assert fmt.count("\\t") == len(spec.fields) and fmt.endswith("\\n") != spec.pairs


def test_every_quirk_is_in_the_labs_index():
    """lab/NOTES.md indexes the kernel and stap quirks the collector handles, each under
    a `Quirk (...)` comment in the templates or render.py."""
    root = TEMPLATE_DIR.parent.parent
    notes = (root / "lab" / "NOTES.md").read_text()
    index = notes[notes.index("## Kernel and stap quirks"):]
    rows = [line for line in index.splitlines() if line.startswith("| ") and "---" not in line]
    sources = [*TEMPLATE_DIR.glob("*.j2"), root / "tcpipstat" / "render.py"]
    marks = sum(p.read_text().count("Quirk (") for p in sources)
    assert marks == len(rows) - 1      # (the header row)
