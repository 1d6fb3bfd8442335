"""Arguments -> a validated Plan. Everything is checked here, before any stap runs."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .cli import parse_args
from .counters import GROUPS
from .errors import UsageError
from .filters import Filter, parse_filters
from .model import INDEXES

MAX_TIMEOUT_S = 10 * 365 * 24 * 3600
_KVER = re.compile(r"^[A-Za-z0-9._+~-]{1,100}$")
# stap options a user may pass through: none of them adds code to the script.
_STAP_ARG_OK = (
    re.compile(r"^-D[A-Za-z_][A-Za-z0-9_]{0,63}(=-?[0-9]{1,19})?$"),
    re.compile(r"^-s[0-9]{1,4}$"),
    re.compile(r"^-[twuk]$"),
    re.compile(r"^--suppress-time-limits$"),
)


@dataclass(frozen=True)
class Plan:
    filters: tuple[Filter, ...] = ()
    index: str = "tuple"
    timeout_s: float | None = None
    nozeros: bool = True
    onclose: bool = False
    command: str | None = None
    output: str = "table"
    groups: tuple[str, ...] = GROUPS
    max_sockets: int = 8192
    kernel_release: str | None = None
    overload_guard: bool = True
    stap_args: tuple[str, ...] = ()
    dump_script: bool = False
    save_records: str | None = None
    from_records: str | None = None
    verbose: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def compile_flags(self) -> list[str]:
        """stap options that change the module (so they are part of its cache key)."""
        flags = ["-DMAXSKIPPED=1000000000"]  # report skipped probes, never abort on them
        if not self.overload_guard:
            flags.append("-DSTP_NO_OVERLOAD")
        return flags + list(self.stap_args)


def _timeout(value) -> float | None:
    if value is None:
        return None
    text = str(value)
    try:
        t = float(text)
    except ValueError:
        raise UsageError(f"bad timeout '{text}': expected a number of seconds") from None
    if not math.isfinite(t) or t <= 0 or t > MAX_TIMEOUT_S:
        raise UsageError(f"bad timeout '{text}': expected a number of seconds > 0")
    if t < 0.1:
        raise UsageError(f"bad timeout '{text}': the collector checks the clock every 0.1 s")
    return t


def build_plan(argv: list[str]) -> Plan:
    ns = parse_args(argv)
    if ns.index not in INDEXES:
        raise UsageError(f"bad index '{ns.index}': expected one of {', '.join(INDEXES)}")
    if ns.onclose and ns.index != "tuple":
        raise UsageError(f"onclose needs index=tuple (got index={ns.index})")
    groups = tuple(g for g in ns.groups.split(",") if g)
    for g in groups:
        if g not in GROUPS:
            raise UsageError(f"bad group '{g}': expected some of {', '.join(GROUPS)}")
    if not groups:
        raise UsageError("no counter group selected")
    try:
        max_sockets = int(ns.max_sockets)
    except ValueError:
        raise UsageError(f"bad --max-sockets '{ns.max_sockets}': expected a number") from None
    if not 64 <= max_sockets <= 1 << 20:
        raise UsageError(f"bad --max-sockets '{ns.max_sockets}': expected 64 to {1 << 20}")
    if ns.kernel_release is not None and not _KVER.match(ns.kernel_release):
        raise UsageError(f"bad kernel release '{ns.kernel_release}'")
    stap_args = tuple(ns.stap_args or ())
    for a in stap_args:
        if not any(r.match(a) for r in _STAP_ARG_OK):
            raise UsageError(f"--stap-arg '{a}' is not allowed (allowed: -DNAME=NUMBER, -sNUM, -t, -w, -u, -k, "
                             "--suppress-time-limits)")
    if ns.command is not None and not ns.command.strip():
        raise UsageError("empty -c command")
    if ns.from_records and (ns.command or ns.save_records):
        raise UsageError("--from-records reports a saved run: it cannot be combined with -c or --save-records")
    return Plan(
        filters=tuple(parse_filters(ns.filters)),
        index=ns.index,
        timeout_s=_timeout(ns.timeout),
        nozeros=bool(ns.nozeros),
        onclose=bool(ns.onclose),
        command=ns.command,
        output=ns.output,
        groups=tuple(g for g in GROUPS if g in groups),
        max_sockets=max_sockets,
        kernel_release=ns.kernel_release,
        overload_guard=ns.overload_guard,
        stap_args=stap_args,
        dump_script=ns.dump_script,
        save_records=ns.save_records,
        from_records=ns.from_records,
        verbose=ns.verbose,
    )
