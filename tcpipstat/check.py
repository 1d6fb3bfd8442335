"""``tcpipstat --check``: can this host collect? Diagnoses without collecting.

Each check is a :class:`Finding`: ok (True), a problem (False) or not known
(None), with what was seen and, for a problem, the command that fixes it on
Debian/Ubuntu and on Fedora/RHEL. Files are read below ``sysroot`` so the tests
can point the checks at a prepared tree. The verdict on headers and debuginfo is
stap's own: a pass-2 run of tcpipstat's probe check, which also tells which
counters this kernel provides.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .counters import points_for_groups, select
from .errors import ExitStatus, TcpipstatError
from .render import resolve_points
from .stap import Toolchain

# /sys/firmware/efi/efivars/SecureBoot-<EFI global variable GUID>: 4 attribute bytes, then 1 = on
_SECURE_BOOT = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
# where stap looks for the kernel's DWARF (its dwflpp search path, Debian and Fedora layouts)
_VMLINUX = ("usr/lib/debug/boot/vmlinux-{k}", "usr/lib/debug/lib/modules/{k}/vmlinux",
            "lib/modules/{k}/build/vmlinux", "boot/vmlinux-{k}")


@dataclass
class Finding:
    name: str
    ok: bool | None
    detail: str
    fix_debian: str = ""
    fix_fedora: str = ""

    def as_dict(self) -> dict:
        fix = {"debian": self.fix_debian, "fedora": self.fix_fedora} if self.ok is False else None
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": fix}


class Host:
    def __init__(self, sysroot: str | Path = "/"):
        self.root = Path(sysroot)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError:
            return None

    def kernel_config(self, kver: str, running: bool) -> tuple[dict[str, str] | None, str]:
        text = self.read(f"boot/config-{kver}")
        if text is not None:
            return _config(text), f"/boot/config-{kver}"
        if running:
            try:
                with gzip.open(self.path("proc/config.gz"), "rt", errors="replace") as f:
                    return _config(f.read()), "/proc/config.gz"
            except OSError:
                pass
        return None, ""


def _config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_[A-Z0-9_]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
        m = re.match(r"^# (CONFIG_[A-Z0-9_]+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def host_checks(kver: str, running: bool, host: Host, euid: int,
                staprun_overridden: bool) -> list[Finding]:
    """Everything that does not need stap: root, modules, kprobes, lockdown, signing, files."""
    cfg, cfg_src = host.kernel_config(kver, running)
    f = [_root(euid), _modules(kver, running, host, cfg, staprun_overridden)]
    if staprun_overridden:
        # the replacement loads the module, and with a replaced stap/staprun the files live
        # elsewhere (the lab's root): nothing more here is this host's business
        return f
    f.append(_kprobes(cfg, cfg_src))
    if running:
        f += _lockdown_and_signing(host, cfg)
    f += _files(kver, host)
    return f


def _on(cfg: dict[str, str] | None, name: str) -> bool | None:
    """Is kernel option ``name`` built in or a module (None: configuration not found)?"""
    return None if cfg is None else cfg.get(name, "n") in ("y", "m")


def _root(euid: int) -> Finding:
    return Finding("root", euid == 0, "running as root" if euid == 0 else f"running as uid {euid}",
                   "run tcpipstat with sudo (staprun loads a kernel module)",
                   "run tcpipstat with sudo (or join the stapusr and stapdev groups)")


def _modules(kver: str, running: bool, host: Host, cfg: dict[str, str] | None,
             staprun_overridden: bool) -> Finding:
    if staprun_overridden:
        return Finding("modules", None, "staprun is replaced (TCPIPSTAT_STAPRUN): the replacement "
                                        "loads the module, so this host's module loading is not "
                                        "checked")
    if not running:
        return Finding("modules", None,
                       f"{kver} is not the running kernel: modules load where it runs")
    mods = host.path("proc/modules").exists()
    disabled = (host.read("proc/sys/kernel/modules_disabled") or "0").strip()
    cmdline = (host.read("proc/cmdline") or "").split()
    if not mods or _on(cfg, "CONFIG_MODULES") is False:
        return Finding("modules", False, "this kernel cannot load modules (built without "
                       "CONFIG_MODULES: no /proc/modules)",
                       "boot a kernel with loadable modules (e.g. Debian's linux-image packages); "
                       "in a container or micro-VM, run tcpipstat on the host",
                       "boot a kernel with loadable modules (Fedora's kernel packages); in a "
                       "container or micro-VM, run tcpipstat on the host")
    if disabled != "0":
        return Finding("modules", False,
                       "module loading was switched off (kernel.modules_disabled=1)",
                       "reboot: kernel.modules_disabled cannot be turned back on",
                       "reboot: kernel.modules_disabled cannot be turned back on")
    return Finding("modules", True, "loadable modules are enabled"
                   + (" (nomodule on the kernel command line)" if "nomodule" in cmdline else ""))


def _kprobes(cfg: dict[str, str] | None, cfg_src: str) -> Finding:
    kp = _on(cfg, "CONFIG_KPROBES"), _on(cfg, "CONFIG_KRETPROBES")
    if kp == (True, True):
        return Finding("kprobes", True, f"CONFIG_KPROBES and CONFIG_KRETPROBES are on ({cfg_src})")
    if None in kp:
        return Finding("kprobes", None,
                       "kernel configuration not found (/boot/config-KVER, /proc/config.gz)")
    return Finding("kprobes", False, f"this kernel has no kprobes ({cfg_src}): SystemTap's kernel "
                   "probes cannot attach",
                   "boot a kernel built with CONFIG_KPROBES=y (Debian's are)",
                   "boot a kernel built with CONFIG_KPROBES=y (Fedora's are)")


def _secure_boot(host: Host) -> bool | None:
    """Is the SecureBoot EFI variable on (None: not readable, e.g. no EFI)?"""
    try:
        raw = host.path(_SECURE_BOOT).read_bytes()
    except OSError:
        return None
    return len(raw) >= 5 and raw[4] == 1


def _lockdown_and_signing(host: Host, cfg: dict[str, str] | None) -> list[Finding]:
    f: list[Finding] = []
    mode = re.search(r"\[(\w+)\]", host.read("sys/kernel/security/lockdown") or "")
    sb_note = "; Secure Boot is on" if _secure_boot(host) else ""
    if mode and mode.group(1) != "none":
        f.append(Finding("lockdown", False, f"kernel lockdown is '{mode.group(1)}'{sb_note}: "
                         "unsigned modules are refused",
                         "turn Secure Boot off (mokutil --disable-validation) or sign stap's "
                         "modules with an enrolled key (stap --use-server, or MOK signing)",
                         "turn Secure Boot off, or enroll a key and sign stap's modules "
                         "(stap --use-server)"))
    else:
        f.append(Finding("lockdown", True,
                         ("lockdown is 'none'" if mode else "no lockdown LSM") + sb_note))
    forced = (_on(cfg, "CONFIG_MODULE_SIG_FORCE")
              or "module.sig_enforce=1" in (host.read("proc/cmdline") or ""))
    if forced:
        f.append(Finding("module signing", False, "the kernel only loads signed modules "
                         "(CONFIG_MODULE_SIG_FORCE or module.sig_enforce=1)",
                         "sign stap's modules with a key the kernel trusts (stap --use-server "
                         "with a signing server)", "sign stap's modules (stap --use-server)"))
    elif cfg is not None:
        f.append(Finding("module signing", True, "unsigned modules are allowed"))
    return f


def _files(kver: str, host: Host) -> list[Finding]:
    """The kernel headers and the vmlinux with DWARF that stap compiles against."""
    build = host.path(f"lib/modules/{kver}/build")
    found = [p.format(k=kver) for p in _VMLINUX if host.path(p.format(k=kver)).is_file()]
    return [
        Finding("headers", build.is_dir(),
                f"/lib/modules/{kver}/build " + ("exists" if build.is_dir() else "is missing"),
                f"apt-get install linux-headers-{kver}", f"dnf install kernel-devel-{kver}"),
        Finding("debuginfo", bool(found),
                ("/" + found[0]) if found else f"no vmlinux with debug information for {kver}",
                f"apt-get install linux-image-{kver}-dbg "
                f"(Ubuntu: linux-image-{kver}-dbgsym from ddebs)",
                f"dnf debuginfo-install kernel-{kver}"),
    ]


def stap_checks(kver: str, groups: tuple[str, ...]
                ) -> tuple[list[Finding], list[str], list[str]]:
    """stap itself: present, its version, and pass 2 of the probe check on ``kver``."""
    f: list[Finding] = []
    try:
        tc = Toolchain.find()
        version = tc.version()
    except TcpipstatError as e:
        f.append(Finding("stap", False, e.message, "apt-get install systemtap",
                         "dnf install systemtap"))
        return f, [], []
    f.append(Finding("stap", True, f"{' '.join(tc.stap)}: {version}"))
    try:
        resolved = resolve_points(tc, points_for_groups(groups), kver)
    except TcpipstatError as e:
        f.append(Finding("probe check", False, f"stap -p2 -r {kver}: {e.message}",
                         e.hint or f"apt-get install linux-headers-{kver} linux-image-{kver}-dbg",
                         e.hint or f"dnf install kernel-devel-{kver}; "
                                   f"dnf debuginfo-install kernel-{kver}"))
        return f, [], []
    sel = select(groups, resolved=resolved)
    available, unavailable = list(sel.available), list(sel.unavailable)
    missing = (f", {len(unavailable)} not on this kernel: {', '.join(unavailable)}"
               if unavailable else "")
    f.append(Finding("probe check", True,
                     f"stap -p2 -r {kver}: {len(available)} counters available{missing}"))
    return f, available, unavailable


def run_checks(kver: str, running: bool, groups: tuple[str, ...],
               sysroot: str | Path = "/") -> dict:
    """Every backend's checks on ``kver`` (tcpipstat/backend.py), in order of preference.
    Ready when one can collect; the top-level checks and counters are the first ready
    backend's (what --backend auto would use), else the first backend's."""
    from .backend import backends
    host, per = Host(sysroot), []
    for backend in backends():
        findings, available, unavailable = backend.checks(kver, running, groups, host)
        per.append({"backend": backend.name, "ready": all(f.ok is not False for f in findings),
                    "checks": findings, "available": available, "unavailable": unavailable})
    chosen = next((b for b in per if b["ready"]), None)
    top = chosen or per[0]
    return {"kernel": kver, "running": running, "ready": chosen is not None,
            "backend": chosen["backend"] if chosen else None, "backends": per,
            "checks": top["checks"], "available": top["available"],
            "unavailable": top["unavailable"]}


def report(kver: str, groups: tuple[str, ...], as_json: bool, out) -> int:
    """--check: print what this host can and cannot do; OK when collection can work."""
    result = run_checks(kver, kver == os.uname().release, groups)
    if as_json:
        out.write(json.dumps(_as_json(result), separators=(",", ":")) + "\n")
    else:
        _draw(kver, result, out)
    return ExitStatus.OK if result["ready"] else ExitStatus.ERROR


def _as_json(result: dict) -> dict:
    def findings(fs):
        return [f.as_dict() for f in fs]
    return {**result, "checks": findings(result["checks"]),
            "backends": [{**b, "checks": findings(b["checks"])} for b in result["backends"]]}


_MARK = {True: "[green]ok[/]", False: "[red]PROBLEM[/]", None: "[yellow]unknown[/]"}


def _draw(kver: str, result: dict, out) -> None:
    from rich.console import Console
    from rich.text import Text
    console = Console(file=out, highlight=False, soft_wrap=False)
    console.print(f"[bold]tcpipstat --check[/] for kernel {escape(kver)}"
                  + ("" if result["running"] else " (not the running kernel)"))
    for b in result["backends"]:
        verdict = "[green]can collect[/]" if b["ready"] else "[red]cannot collect[/]"
        console.print(f"\n[bold]{b['backend']}[/] collector: {verdict}")
        console.print(_findings_table(b["checks"]))
        if b["available"] or b["unavailable"]:
            console.print(Text(f"counters here: {', '.join(b['available']) or 'none'}"
                               + (f"; not here: {', '.join(b['unavailable'])}"
                                  if b["unavailable"] else "")))
    console.print(f"[green]collection can work here[/] (with {result['backend']})"
                  if result["ready"] else
                  "[red]collection cannot work here until the problems above are fixed[/]")


def _findings_table(findings):
    from rich.table import Table
    from rich.text import Text
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(no_wrap=True)
    t.add_column(no_wrap=True)
    t.add_column()
    for f in findings:          # (details may quote a path or a tool's message: not markup)
        t.add_row(_MARK[f.ok], Text(f.name), Text(f.detail))
        if f.ok is False:
            t.add_row("", "", Text(f"fix (Debian/Ubuntu): {f.fix_debian}"))
            t.add_row("", "", Text(f"fix (Fedora/RHEL): {f.fix_fedora}"))
    return t
