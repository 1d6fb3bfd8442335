"""Every recorded fixture and capture reported in every format: the cases whose output
must stay byte-identical through refactoring (tests/test_golden.py compares them with
tests/golden/; ``python -m tests.golden_cases --write`` records them again, after a
change of output that is meant)."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE / "golden"

FORMATS = ((), ("--json",), ("--csv",))
RECORD_VARIANTS = ((), ("index=lport",), ("index=raddr",), ("index=comm",), ("index=pid",),
                   ("nozeros=0",), ("--sort", "bytes", "--top", "2"), ("onclose=1",), ("-u",),
                   ("*:*-*:7001",), ("-x", "1"))
CAPTURE_VARIANTS = ((), ("index=rport",), ("index=laddr",), ("nozeros=0",),
                    ("--sort", "RetransSegs", "--top", "3"), ("*:*-*:5201",))


def cases() -> list[tuple[str, list[str]]]:
    """(name, argv) of every golden case, in a stable order."""
    out = []
    for rec in sorted(FIXTURES.glob("*.records")):
        for variant in RECORD_VARIANTS:
            for fmt in FORMATS:
                argv = ["--from-records", str(rec), *variant, *fmt]
                out.append((_name(rec.name, variant, fmt), argv))
    for cap in sorted((FIXTURES / "capture").glob("*.pcap*")):
        for variant in CAPTURE_VARIANTS:
            for fmt in FORMATS:
                out.append((_name(cap.name, variant, fmt), ["--read", str(cap), *variant, *fmt]))
    return out


def _name(base: str, variant, fmt) -> str:
    words = " ".join([*variant, *fmt]) or "default"
    digest = hashlib.sha1(words.encode()).hexdigest()[:8]
    return f"{base}.{digest}"


def render(argv: list[str]) -> str:
    """One case's whole result: its exit status, stdout and stderr, paths made relative."""
    from tests.conftest import run_cli
    status, out, err = run_cli(*argv)
    text = f"argv: {' '.join(argv)}\nstatus: {status}\n--- stdout\n{out}--- stderr\n{err}"
    return text.replace(str(FIXTURES), "FIXTURES")


def write() -> int:
    GOLDEN.mkdir(exist_ok=True)
    for old in GOLDEN.glob("*.out"):
        old.unlink()
    for name, argv in cases():
        (GOLDEN / f"{name}.out").write_text(render(argv))
    return len(cases())


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.golden_cases --write")
    print(f"{write()} golden outputs written to {GOLDEN}")
