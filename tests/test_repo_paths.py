"""Tier 1: every repository path that a comment, docstring or document names exists
(a renamed or removed file must take its mentions with it)."""
from __future__ import annotations

import re
import subprocess

from .conftest import ROOT

# a path inside the repository: one of its top folders, then a file or folder name
_PATH = re.compile(r"(?<![\w./-])((?:tcpipstat|tests|bench|lab|man|\.ci)/"
                   r"[A-Za-z0-9_./-]*[A-Za-z0-9_])")
_SOURCES = ("*.py", "*.j2", "*.md", "*.sh", "*.c", "*.cfg", "*.toml", "run-tests", "lab/*")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", *_SOURCES], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [p for p in out.splitlines() if not p.startswith("tests/golden/")]


def named_paths() -> dict[str, set[str]]:
    """{path named: the files that name it}."""
    named: dict[str, set[str]] = {}
    for rel in _tracked():
        text = (ROOT / rel).read_text(errors="replace")
        for m in _PATH.finditer(text):
            named.setdefault(m.group(1).rstrip("."), set()).add(rel)
    return named


def test_every_named_path_exists():
    missing = {p: sorted(by) for p, by in named_paths().items()
               if not any(ROOT.glob(p)) and not (ROOT / p).exists()}
    assert not missing, f"paths named but not in the repository: {missing}"


def test_the_check_sees_paths():
    named = named_paths()
    assert "tcpipstat/records.py" in named and "lab/NOTES.md" in named
