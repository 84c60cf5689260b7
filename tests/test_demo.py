"""The demo: the cheapest scenarios, trained through demo/run_all.py into a temp logdir,
must say what demo/README.md says they say.

F (the article's data in +-1e10): Adam's velocity of the kernel is the first non-finite
value, +Inf at step 3, two steps before the loss.  A as written: no NaN/Inf at all.
E as written (evaluated over seeds 0-19): the first exact tie is at seed 11, -Inf in
the `log` layer.  A regression in the writer (wrong step, wrong site, a lost record)
or in a scenario (a changed seed or model) fails here.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(ROOT, "demo", "run_all.py")
README = os.path.join(ROOT, "demo", "README.md")
RUNS = ["f_huge_data", "a_unscaled_inputs", "e_log_abs_diff"]

EXPECTED = {
    "f_huge_data": dict(
        step=3,
        layer="dense",
        kind="optimizer_state",
        tensor="velocity/kernel",
        nan=0,
        posinf=1,
        neginf=0,
        loss_step=5,
    ),
    "a_unscaled_inputs": None,
    "e_log_abs_diff": dict(
        step=11, layer="log", kind="activation", tensor="", nan=0, posinf=0, neginf=1, loss_step=11
    ),
}


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return env


def _run_all(*args, timeout=240):
    proc = subprocess.run(
        [sys.executable, RUN_ALL] + list(args),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("demo_logs"))
    proc = _run_all("--only", ",".join(RUNS), "--logdir", logdir, "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    return logdir, {r["name"]: r for r in summary["runs"]}


def _readme_row(name):
    with open(README) as f:
        for line in f:
            if line.startswith("| `%s` |" % name):
                return line
    raise AssertionError("demo/README.md has no table row for %s" % name)


def _site(first):
    return "/".join(p for p in (first["layer"], first["kind"], first["tensor"]) if p)


@pytest.mark.parametrize("name", RUNS)
def test_first_nonfinite_is_where_the_readme_says(demo, name):
    logdir, runs = demo
    run = runs[name]
    expected = EXPECTED[name]
    assert run["logs_agree"], "the event files and the training process disagree: %r" % run
    assert not run["reused"]
    first = run["first_nonfinite"]
    row = _readme_row(name)
    if expected is None:
        assert first is None, "expected a finite run, got %r" % first
        assert run["rows"] == run["steps"] > 0  # log_every=1: a row per step
        assert "| none |" in row
        return
    assert first is not None, "no non-finite value recorded for %s" % name
    got = {k: first[k] for k in ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf")}
    want = {k: v for k, v in expected.items() if k != "loss_step"}
    assert got == want
    assert run["keras_loss_nonfinite_step"] == expected["loss_step"]
    # The README's table row names the same step and site.
    assert "step %d: %s" % (first["step"], _site(first)) in row, row
    cell = re.search(r"loss non-finite from step (\d+)|\| from step (\d+) \|", row)
    assert cell and int(cell.group(1) or cell.group(2)) == expected["loss_step"], row


def test_f_huge_data_propagation_in_the_rows(demo):
    """The heatmap story of F: velocity +Inf at 3, kernel NaN at 4, activation and loss NaN at 5."""
    from tb_nanwatch import reader, stats

    logdir, _ = demo
    provider, ctx, eid = reader.open_logdir(os.path.join(logdir, "f_huge_data"))
    runs = reader.list_runs(provider, ctx, eid)
    data = reader.read_run(provider, ctx, eid, sorted(runs)[0])
    col = stats.STAT_INDEX["first_nonfinite_step"]
    first_step = {}
    for s, label in enumerate(data.labels):
        steps = data.rows[:, s, col]
        steps = steps[~(steps != steps)]  # drop NaN
        if len(steps):
            first_step[label] = int(steps.min())
    assert first_step["dense/optimizer_state/velocity/kernel"] == 3
    assert first_step["dense/weight/kernel"] == 4
    assert first_step["dense/activation"] == 5
    assert first_step["sequential/loss"] == 5
    assert min(first_step.values()) == 3
    # The flight recorder holds every step up to the first non-finite one.
    assert list(data.flight_steps) == [0, 1, 2, 3]


def test_diagnosis_names_the_cause_first(demo):
    """F: its inputs in +-1e10 first, then its targets, then Adam's velocity; E: a log of 0 inside
    a layer; A as written: nothing (finite, no warning sign)."""
    from tb_nanwatch import diagnosis, early_warning, reader

    logdir, _ = demo
    got = {}
    for name in RUNS:
        provider, ctx, eid = reader.open_logdir(os.path.join(logdir, name))
        runs = reader.list_runs(provider, ctx, eid)
        data = reader.read_run(provider, ctx, eid, sorted(runs)[0])
        got[name] = ([d["cause"] for d in diagnosis.diagnose(data)], early_warning.from_run(data))
    assert got["f_huge_data"][0] == [
        "unscaled_inputs",
        "unscaled_targets",
        "optimizer_state_overflow",
    ]
    assert got["e_log_abs_diff"][0] == ["domain_error"]
    assert got["a_unscaled_inputs"] == ([], None)


def test_rerun_reuses_the_logs_and_prints_the_summary_line(demo):
    logdir, runs = demo
    proc = _run_all(
        "--only", "f_huge_data", "--only", "a_unscaled_inputs", "--logdir", logdir, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {l.split()[0]: l for l in proc.stdout.splitlines() if l.strip()}
    assert "reused" in lines["f_huge_data"]
    assert "first at step 3: dense/optimizer_state/velocity/kernel (1 +Inf)" in lines["f_huge_data"]
    assert "loss non-finite from step 5" in lines["f_huge_data"]
    assert "no NaN/Inf in 160 steps" in lines["a_unscaled_inputs"]
    assert "training" not in proc.stderr


def test_report_cli_on_the_demo_logs(demo):
    """`tb-nanwatch report` (what demo/README.md tells people to run) agrees and gates."""
    logdir, _ = demo
    cli = [sys.executable, "-m", "tb_nanwatch.cli", "report"]
    proc = subprocess.run(
        cli + [os.path.join(logdir, "f_huge_data"), "--json"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert "velocity/kernel" in text and '"optimizer_state"' in text
    proc = subprocess.run(
        cli + [os.path.join(logdir, "a_unscaled_inputs")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_unknown_run_is_a_usage_error(tmp_path):
    proc = _run_all("--only", "no_such_run", "--logdir", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "no_such_run" in proc.stderr


def test_cli_and_tab_agree_on_every_demo_run(demo):
    """One RunView behind both: the report's JSON and the tab's routes say the same of each run."""
    import damage_helpers as dh
    from test_plugin_backend import App

    logdir, _ = demo
    rc, out, err = dh.run_cli(logdir, "--json")
    entries = {e["run"]: e for e in json.loads(out)["runs"]}
    app = App(logdir)
    overview = {(o["run"], o["group"]): o for o in app.json("/overview")}
    assert set(entries) == {run for run, _ in overview}
    for run, entry in entries.items():
        assert app.json("/first_nonfinite", run=run) == entry["first_nonfinite"], run
        line = overview[(run, None)]
        assert line["loss_scale_skips"] == entry["skipped_steps"], run
        assert (line["state"] == "nonfinite") == (entry["first_nonfinite"] is not None), run
        assert app.json("/diagnosis", run=run)["diagnosis"] == entry["diagnosis"], run
