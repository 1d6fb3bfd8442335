#!/usr/bin/env python3
"""A stand-in for `stap` in tier-1 tests of tcpipstat's process handling (no kernel).

Behaviour is chosen with FAKE_STAP_MODE: ok (default), fail-p4, no-debuginfo.
-p2 lists every probe point given (a module's function too) except those in
FAKE_STAP_MISSING (comma-separated function or tracepoint names); -p4 -m NAME writes
NAME.ko into the current directory.
FAKE_STAP_P2_S / FAKE_STAP_P4_S: seconds each pass takes; FAKE_STAP_LOG: a file that
gets "start|end PASS TIME" lines (tests of the speculative compile).
"""
import atexit
import os
import re
import sys
import time

args = sys.argv[1:]
_log = os.environ.get("FAKE_STAP_LOG")
_pass = "p2" if "-p2" in args else "p4" if "-p4" in args else ""
if _log and _pass:
    with open(_log, "a") as f:
        f.write(f"start {_pass} {time.time():.3f}\n")
    atexit.register(lambda: open(_log, "a").write(f"end {_pass} {time.time():.3f}\n"))
if _pass:
    time.sleep(float(os.environ.get(f"FAKE_STAP_{_pass.upper()}_S", "0")))
mode = os.environ.get("FAKE_STAP_MODE", "ok")
if args == ["-V"]:
    print("Systemtap translator/driver (version 9.9/0.0, fake)")
    sys.exit(0)
if mode == "no-debuginfo":
    print("semantic error: missing x86_64 kernel/module debuginfo [man warning::debuginfo] under "
          "'/lib/modules/9.9/build'", file=sys.stderr)
    sys.exit(1)
script = open(args[-1]).read()
if "-p2" in args:
    missing = set(filter(None, os.environ.get("FAKE_STAP_MISSING", "").split(",")))
    print("# probes")
    for where, fn, ret in re.findall(r'probe (kernel|module\("\w+"\))\.function\("(\w+)"\)'
                                     r'(\.return)? \?', script):
        if fn not in missing:
            print(f'{where}.function("{fn}@net/fake.c:1"){ret}? /* pc=_stext+0x1 */')
    for tp in re.findall(r'probe kernel\.trace\("([\w:]+)"\) \?', script):
        if tp.split(":")[1] not in missing:
            print(f'kernel.trace("{tp}")? /* <- kernel.trace("{tp}")? */')
    sys.exit(0)
if "-p4" in args:
    if mode == "fail-p4":
        print("semantic error: type mismatch (long vs. string): identifier 'x' at t.stp:1:1",
              file=sys.stderr)
        print("Pass 4: compilation failed.", file=sys.stderr)
        sys.exit(1)
    name = args[args.index("-m") + 1]
    with open(f"{name}.ko", "w") as f:
        f.write(script)
    print(f"{name}.ko")
    sys.exit(0)
sys.exit(2)
