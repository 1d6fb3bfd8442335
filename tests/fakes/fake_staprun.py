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
  transport      as end, but one socket record never arrives, and the module warns of it
                 at exit as stap 4.8 did in a loaded lab run
  vanish         as end, but one socket record never arrives, and nothing says so
  timing-early   as timing, but the report's lock contention lines come first, before
                 the records (seen on 6.12: another CPU's buffer reached stapio first)
FAKE_STAPRUN_MARK_S: seconds to wait after each interval mark (I record), so that a reader
sees the windows arrive one by one, as from a live collector.
"""
import os
import signal
import sys
import time

mode = os.environ.get("FAKE_STAPRUN_MODE", "end")
lines = [line for line in open(os.environ["FAKE_RECORDS"]) if not line.startswith("#")]
trailer = [line for line in lines if line.startswith("T\t")]
garbled = False
lost = False
pace = float(os.environ.get("FAKE_STAPRUN_MARK_S", "0"))
got = []
if mode == "wait-int":
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
report = open(os.environ["FAKE_TIMING"]).readlines() if mode.startswith("timing") else []
early = ([line for line in report if "lock contention occurred" in line]
         if mode == "timing-early" else [])
sys.stdout.write("".join(early))
for line in lines:
    if line.startswith("T\t"):
        continue
    if mode == "garble" and line.startswith("R\t") and not garbled:
        line = line.rstrip("\n")[:60]   # cut mid-record: the next record follows on the same line
        garbled = True
    if mode in ("transport", "vanish") and line.startswith("R\t") and not lost:
        lost = True
        continue
    sys.stdout.write(line)
    if pace and line.startswith("I\t") and not got:
        sys.stdout.flush()
        time.sleep(pace)
sys.stdout.flush()
if mode == "die":
    print("ERROR: probe overhead (555608199 cycles) exceeded threshold (500000000 cycles)",
          file=sys.stderr)
    sys.exit(1)
if mode == "wait-int":
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    print("WARNING: Number of errors: 0, skipped probes: 3", file=sys.stderr)
if mode == "transport":
    print("WARNING: There were 1 transport failures. Try stap -s to increase the buffer size "
          "from 16.", file=sys.stderr)
sys.stdout.write("".join(trailer))
sys.stdout.write("".join(line for line in report if line not in early))
sys.exit(0)
