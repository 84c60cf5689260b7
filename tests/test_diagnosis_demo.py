"""The diagnosis on real training runs: each cause's demo run (demo/scenarios.py CAUSE_DEMOS)
is diagnosed with that cause first and its fixed run stays finite with no cause; healthy runs
get no cause and no early warning; the gradually diverging SGD regression warns at least 20
steps before its first non-finite value.  The cheapest runs only (a few seconds each); the
others are checked by `demo/run_all.py --diagnosis` (demo/README.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "demo"))
import scenarios  # noqa: E402

from tb_nanwatch import causes  # noqa: E402

# The cheapest pairs (a few seconds of training each) of the causes no other test trains;
# tests/test_demo.py checks F, A and E, `demo/run_all.py` every pair of CAUSE_DEMOS.
CAUSES = (
    "nonfinite_input",
    "nonfinite_target",
    "learning_rate_too_high",
    "optimizer_state_overflow",
    "loss_scale_collapse",
    "vanishing_gradients",
    "recurrent_explosion",
    "optimizer_zero_division",
)
HEALTHY = ("lr_gradual_fixed", "nan_in_data_fixed")
RUNS = sorted({n for c in CAUSES for n in scenarios.CAUSE_DEMOS[c]} | set(HEALTHY))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("cause_demos"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "demo", "run_all.py"),
            "--only",
            ",".join(RUNS),
            "--logdir",
            logdir,
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", logdir, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    return {r["run"]: r for r in json.loads(proc.stdout)["runs"]}


@pytest.mark.parametrize("cause", CAUSES)
def test_cause_named_first_and_the_fix_stays_finite(reports, cause):
    broken, fixed = scenarios.CAUSE_DEMOS[cause]
    got = reports[broken]
    assert (got["first_nonfinite"] is None) == (not causes.CAUSES_BY_ID[cause].blowup)
    assert got["diagnosis"], "%s: no cause named" % broken
    assert got["diagnosis"][0]["cause"] == cause, [d["cause"] for d in got["diagnosis"]]
    assert got["diagnosis"][0]["evidence"] and got["diagnosis"][0]["steps"]
    assert (
        got["diagnosis"][0]["sites"] or cause == "loss_scale_collapse"
    )  # an event, of no one site
    assert reports[fixed]["first_nonfinite"] is None
    assert reports[fixed]["diagnosis"] == [] and reports[fixed]["early_warning"] is None


@pytest.mark.parametrize("run", HEALTHY)
def test_healthy_runs_get_no_cause_and_no_warning(reports, run):
    assert reports[run]["first_nonfinite"] is None
    assert reports[run]["diagnosis"] == [] and reports[run]["early_warning"] is None


def test_gradual_divergence_is_warned_20_steps_ahead(reports):
    got = reports["lr_gradual"]
    first, warning = got["first_nonfinite"]["step"], got["early_warning"]
    assert first >= 150, "not a gradual divergence: first non-finite at step %d" % first
    assert warning is not None and first - warning["step"] >= 20, (warning, first)
    assert warning["predicted_step"] > warning["step"]
