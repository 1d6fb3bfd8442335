#!/usr/bin/env python3
"""A stand-in for `staprun MODULE.ko args` in tier-1 tests: replays the records file in
FAKE_RECORDS (a real lab recording) without its trailer, then, by FAKE_STAPRUN_MODE:
  end (default)  print the trailer and exit 0
  wait-int       wait for SIGINT, then print the trailer, warn about skipped probes, exit 0
  die            exit 1 with an overload error and no trailer
  garble         as end, but the first socket record is cut short and run into the
                 next one, as records written from two CPUs once interleaved
  timing         as end, then the per-probe report that `stap -t` modules write to
                 stdout at exit (FAKE_TIMING: a report recorded in the lab)
  timing-early   as timing, but the report's lock contention lines come first, before
                 the records (seen on 6.12: another CPU's buffer reached stapio first)
"""
import os
import signal
import sys
import time

mode = os.environ.get("FAKE_STAPRUN_MODE", "end")
lines = [l for l in open(os.environ["FAKE_RECORDS"]) if not l.startswith("#")]
trailer = [l for l in lines if l.startswith("T\t")]
garbled = False
report = open(os.environ["FAKE_TIMING"]).readlines() if mode.startswith("timing") else []
early = [l for l in report if "lock contention occurred" in l] if mode == "timing-early" else []
sys.stdout.write("".join(early))
for l in lines:
    if l.startswith("T\t"):
        continue
    if mode == "garble" and l.startswith("R\t") and not garbled:
        l = l.rstrip("\n")[:60]      # cut mid-record: the next record follows on the same line
        garbled = True
    sys.stdout.write(l)
sys.stdout.flush()
if mode == "die":
    print("ERROR: probe overhead (555608199 cycles) exceeded threshold (500000000 cycles)", file=sys.stderr)
    sys.exit(1)
if mode == "wait-int":
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    print("WARNING: Number of errors: 0, skipped probes: 3", file=sys.stderr)
sys.stdout.write("".join(trailer))
sys.stdout.write("".join(l for l in report if l not in early))
sys.exit(0)
