"""Build wiring of the compiled parts (C), both optional:

* the --read path: tcpipstat/capture/csrc -> tcpipstat.capture._fast;
* the socket records' reader: tcpipstat/csrc_records -> tcpipstat._records.

The rest of the package is declared in setup.cfg. Where no C compiler or no Python headers
exist, ``pip install .`` still installs tcpipstat, and each takes its pure-Python path
(tcpipstat/capture/fast.py says which one --read took; tcpipstat/records.py, Parser.compiled,
which one reads the records).
"""
from setuptools import Extension, setup

CSRC = "tcpipstat/capture/csrc"

setup(
    ext_modules=[
        Extension(
            "tcpipstat.capture._fast",
            sources=[f"{CSRC}/engine.c", f"{CSRC}/decode.c", f"{CSRC}/flows.c",
                     f"{CSRC}/counters.c"],
            depends=[f"{CSRC}/fast.h"],
            optional=True,
        ),
        Extension("tcpipstat._records", sources=["tcpipstat/csrc_records/records.c"],
                  optional=True),
    ],
    # the sources go in the sdist (MANIFEST.in), not among the installed files
    exclude_package_data={"tcpipstat.capture": ["csrc/*"], "tcpipstat": ["csrc_records/*"]},
)
