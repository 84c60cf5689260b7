"""bench/eval_causes/cases.py: every case names a cause of the table (the suite itself is slow,
run by bench/eval_causes/run_eval.py, not here)."""

import importlib.util
import os

from tb_nanwatch import causes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_cases():
    path = os.path.join(ROOT, "bench", "eval_causes", "cases.py")
    spec = importlib.util.spec_from_file_location("eval_causes_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
