"""Build wiring of the compiled --read path (tcpipstat/capture/csrc -> tcpipstat.capture._fast).

The rest of the package is declared in setup.cfg. The extension is optional: where no C
compiler or no Python headers exist, ``pip install .`` still installs tcpipstat and
``--read`` takes its pure-Python path (tcpipstat/capture/fast.py says which one ran).
"""
from setuptools import Extension, setup

CSRC = "tcpipstat/capture/csrc"

setup(
    ext_modules=[Extension(
        "tcpipstat.capture._fast",
        sources=[f"{CSRC}/engine.c", f"{CSRC}/decode.c", f"{CSRC}/flows.c",
                 f"{CSRC}/counters.c"],
        depends=[f"{CSRC}/fast.h"],
        optional=True,
    )],
    # the sources go in the sdist (MANIFEST.in), not among the installed files
    exclude_package_data={"tcpipstat.capture": ["csrc/*"]},
)
