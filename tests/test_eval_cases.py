"""bench/eval_causes/cases.py: every case names a cause of the table (the suite itself is slow,
run by bench/eval_causes/run_eval.py, not here)."""

import importlib.util
import os
import sys

from tb_nanwatch import causes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cases(name="cases"):
    here = os.path.join(ROOT, "bench", "eval_causes")
    sys.path.insert(0, here)  # fresh_cases imports cases' helpers
    try:
        spec = importlib.util.spec_from_file_location(
            "eval_causes_" + name, os.path.join(here, name + ".py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(here)
    return module.CASES


def test_every_case_names_a_cause_of_the_table():
    cases = load_cases()
    unknown = [
        (c.name, c.cause) for c in cases if c.cause is not None and c.cause not in causes.CAUSE_IDS
    ]
    assert unknown == []
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    assert sum(c.cause is not None for c in cases) >= 30
    assert sum(c.cause is None for c in cases) >= 10
    assert all(callable(c.fn) and c.what for c in cases)


def test_the_fresh_batch_covers_every_blow_up_cause_twice():
    """fresh_cases.py, written while the rules were tuned: two blow-ups per blow-up cause of
    the table (warnings have none), and healthy runs."""
    fresh = load_cases("fresh_cases")
    names = {c.name for c in fresh} | {c.name for c in load_cases()}
    assert len(names) == len(fresh) + len(load_cases()), "case names must be unique"
    counts = {}
    for c in fresh:
        assert c.cause is None or c.cause in causes.CAUSE_IDS
        counts[c.cause] = counts.get(c.cause, 0) + 1
    blowup = [c.id for c in causes.CAUSES if c.blowup]
    assert all(counts.get(cause, 0) >= 2 for cause in blowup), counts
    assert counts[None] >= 8


def test_the_second_fresh_batch_covers_every_blow_up_cause_twice():
    """fresh2_cases.py, written after both other batches and apart from them: two blow-ups per
    blow-up cause, at least 8 healthy runs, names unique across all three batches, and the
    counterfactual switch off."""
    here = os.path.join(ROOT, "bench", "eval_causes")
    fresh2 = load_cases("fresh2_cases")
    others = load_cases() + load_cases("fresh_cases")
    names = {c.name for c in fresh2} | {c.name for c in others}
    assert len(names) == len(fresh2) + len(others), "case names must be unique"
    counts = {}
    for c in fresh2:
        assert c.cause is None or c.cause in causes.CAUSE_IDS
        assert callable(c.fn) and c.what
        counts[c.cause] = counts.get(c.cause, 0) + 1
    blowup = [c.id for c in causes.CAUSES if c.blowup]
    assert all(counts.get(cause, 0) >= 2 for cause in blowup), counts
    assert counts[None] >= 8
    with open(os.path.join(here, "fresh2_cases.py")) as f:
        assert "\nUNDO = False\n" in f.read()


def test_the_third_fresh_batch_covers_every_blow_up_cause_twice():
    """fresh3_cases.py, written after the three other files and apart from them: two blow-ups
    per blow-up cause, at least 8 healthy runs, at most 2 custom train_steps, names unique
    across all four files, and the counterfactual switch off."""
    here = os.path.join(ROOT, "bench", "eval_causes")
    fresh3 = load_cases("fresh3_cases")
    others = load_cases() + load_cases("fresh_cases") + load_cases("fresh2_cases")
    names = {c.name for c in fresh3} | {c.name for c in others}
    assert len(names) == len(fresh3) + len(others), "case names must be unique"
    counts = {}
    for c in fresh3:
        assert c.cause is None or c.cause in causes.CAUSE_IDS
        assert callable(c.fn) and c.what
        counts[c.cause] = counts.get(c.cause, 0) + 1
    blowup = [c.id for c in causes.CAUSES if c.blowup]
    assert all(counts.get(cause, 0) >= 2 for cause in blowup), counts
    assert counts[None] >= 8
    with open(os.path.join(here, "fresh3_cases.py")) as f:
        source = f.read()
    assert "\nUNDO = False\n" in source
    assert source.count("def train_step(") <= 2
