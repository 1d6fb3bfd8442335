"""Tier 1: every recorded fixture and capture, in every format and the main variants,
reports byte for byte what tests/golden/ holds (tests/golden_cases.py).

The goldens were recorded before the seams refactoring; a change that alters any of
them is a change of behaviour, to be made on purpose and recorded again with
``python -m tests.golden_cases --write``."""
from __future__ import annotations

import pytest

from tests.golden_cases import GOLDEN, cases, render

CASES = cases()


def test_every_case_has_a_golden():
    names = {f"{name}.out" for name, _ in CASES}
    on_disk = {p.name for p in GOLDEN.glob("*.out")}
    assert names == on_disk


@pytest.mark.parametrize("name,argv", CASES, ids=[n for n, _ in CASES])
def test_output_is_unchanged(name, argv):
    assert render(argv) == (GOLDEN / f"{name}.out").read_text()
