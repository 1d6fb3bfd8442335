#!/usr/bin/env python3
"""The classic tcpipstat.stp, for side-by-side benchmarks only (it is not part of tcpipstat).

It is taken at run time from the SystemTap example text the project was seeded with
(--seed FILE, default: the first ../shared/seeds/002_*.txt next to the checkout, as the
issue describes) and patched only as far as needed to elaborate on the lab kernels:

* ``$sock->sk`` -> ``$sk``: tcp_sendmsg() takes the struct sock itself since Linux 4.1.
* ``probe ipmib.* {}`` -> the ipmib probes that still resolve (InUnknownProtos and
  ReasmTimeout hook icmp_send(), an inline wrapper since Linux 5.7; others hook
  functions renamed or inlined since).

Its probes fire and count exactly as written; its own filter function is ignored by
stap >= 4.0 in favour of the tapsets' default (see lab/NOTES.md), which changes what it
reports, not what it costs.

    python3 bench/classic.py [--seed FILE] > classic.stp
"""
from __future__ import annotations

import argparse
import glob
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IPMIB_OK = ("ipmib.InReceives", "ipmib.OutRequests", "ipmib.ReasmReqds", "ipmib.FragOKs")


def default_seed() -> Path:
    found = sorted(glob.glob(str(ROOT.parent / "shared" / "seeds" / "002_*.txt")))
    if not found:
        raise SystemExit("bench/classic.py: no seed 002_*.txt found; pass --seed FILE")
    return Path(found[0])


def classic_script(seed: Path) -> str:
    text = seed.read_text(errors="replace")
    start = text.find("#! /usr/bin/env stap")
    if start < 0 or "tcpipstat.stp" not in text[start:start + 2000]:
        raise SystemExit(f"bench/classic.py: {seed} does not hold the classic tcpipstat.stp")
    # the example text ends at a line holding only "|" (the seed's block separator), or at EOF
    lines = text[start:].splitlines()
    end = next((i for i, line in enumerate(lines) if line.strip() == "|"), len(lines))
    script = "\n".join(lines[:end]) + "\n"
    patched, n = re.subn(r"\$sock->sk", "$sk", script)
    if n == 0:
        raise SystemExit("bench/classic.py: expected '$sock->sk' in the classic script")
    patched, n = re.subn(r"probe ipmib\.\* \{\}", "probe " + ", ".join(IPMIB_OK) + " {}", patched)
    if n != 1:
        raise SystemExit("bench/classic.py: expected one 'probe ipmib.* {}' in the classic script")
    return patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=Path, default=None)
    a = ap.parse_args()
    sys.stdout.write(classic_script(a.seed or default_seed()))


if __name__ == "__main__":
    main()
