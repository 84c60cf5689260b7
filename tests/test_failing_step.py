"""The whole loop on one real model: train in stop mode -> report (bundle, the producer's ops
in the user's code) -> replay from the command line -> the report and the tab say what the
replay found."""

import contextlib
import inspect
import io
import json
import os
import shutil
import subprocess

import damage_helpers as dh
import pytest
import stop_scenarios as sc
from test_plugin_backend import App
from test_replay import stopped_run

from tb_nanwatch import failing_step

FRONTEND = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "frontend")


def _log_line():
    lines, start = inspect.getsourcelines(sc.LogFeatures.call)
    return start + next(i for i, text in enumerate(lines) if "tf.math.log" in text)


def test_stop_report_replay_report(tmp_path):
    run = tmp_path / "logs" / "log_of_zero"
    stopped_run(sc.log_of_zero, run)
    where = "stop_scenarios.py:%d in call" % _log_line()

    rc, out, err = dh.run_cli(tmp_path / "logs", "--json")
    (entry,) = json.loads(out)["runs"]
    assert rc == 1 and entry["first_nonfinite"]["layer"] == "log_features"
    assert entry["bundle"]["step"] == entry["first_nonfinite"]["step"] == 4
    assert entry["bundle"]["state"] == "before_step" and os.path.isdir(entry["bundle"]["path"])
    assert {"type": "Log", "line": _log_line(), "function": "call"}.items() <= next(
        op for op in entry["producer_ops"] if op["type"] == "Log"
    ).items()
    assert entry["replay"] is None
    rc, text, _ = dh.run_cli(tmp_path / "logs")
    assert "Log at " + where in text and "tb-nanwatch replay " + str(run) in text

    # `tb-nanwatch replay RUN_DIR --json`, in this process (TensorFlow is loaded already).
    from tb_nanwatch import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["replay", str(run), "--json"])
    result = json.loads(out.getvalue())
    assert rc == 1 and result["verdict"] == "reproducible" and result["op"]["type"] == "Log"

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["replay", str(run)]) == 1
    assert (
        "  remedy on replay: clip the gradients (global_clipnorm=1.0), lower the learning rate 10x: "
        "not tried (the step went non-finite in its forward pass" in out.getvalue()
    )

    rc, text, _ = dh.run_cli(tmp_path / "logs")
    assert "op Log at %s, reproducible on replay" % where in text
    # The remedies tried on the same state and batch, and whether each held.
    assert (
        "remedies on replay: clip the gradients (global_clipnorm=1.0), lower the learning rate "
        "10x: not tried (the step went non-finite in its forward pass" in text
    )
    (entry,) = json.loads(dh.run_cli(tmp_path / "logs", "--json")[1])["runs"]
    assert entry["replay"]["verdict"] == "reproducible"
    # The tab's /diagnosis says the same.
    answer = App(tmp_path / "logs").json("/diagnosis", run="log_of_zero")
    assert answer["failing_step"]["replay"]["op"]["type"] == "Log"
    assert answer["failing_step"]["bundle"]["step"] == 4


def test_the_tab_says_which_remedies_held():
    """frontend/diagnosis.js's failingStepLines, run by node on a replay's result."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    replay = {
        "verdict": "reproducible",
        "op": {"type": "Exp", "source": {"file": "/x/my_layers.py", "line": 9, "function": "call"}},
        "remedies": [
            {
                "cause": "reduced_precision_overflow",
                "remedy": "compute the layer in float32",
                "applied": True,
                "finite_after": True,
            },
            {"cause": "domain_error", "remedy": None, "applied": False, "finite_after": None},
            {"cause": None, "remedy": "clip the gradients", "applied": True, "finite_after": False},
            {
                "cause": "x",
                "remedy": "lower the rate",
                "applied": False,
                "why": "before the update",
            },
            {"cause": "y", "remedy": "clip", "applied": False, "why": "before the update"},
        ],
    }
    script = (
        "const m = await import(%s); console.log(JSON.stringify(m.failingStepLines({replay: %s})));"
        % (json.dumps("file://" + os.path.join(FRONTEND, "diagnosis.js")), json.dumps(replay))
    )
    out = subprocess.run(
        [node, "--experimental-detect-module", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == [
        "Op Exp at my_layers.py:9 in call, reproducible on replay.",
        "Remedies on replay: compute the layer in float32: finite after; "
        "clip the gradients: did not hold (a usual guess); "
        "lower the rate, clip: not tried (before the update).",
    ]
    # The report says the same.
    assert (
        "Remedies on replay: %s." % "; ".join(failing_step.remedy_words(replay))
        == json.loads(out)[1]
    )


def test_replay_command_names_the_missing_custom_objects(tmp_path):
    """`tb-nanwatch replay` in a fresh process: a model with a layer of the user's own code
    cannot be rebuilt without it, and the error says how to give it."""
    import subprocess
    import sys

    run = tmp_path / "log_of_zero"
    stopped_run(sc.log_of_zero, run)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "tb_nanwatch.cli", "replay", str(run)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--custom-objects MODULE" in proc.stderr and "LogFeatures" in proc.stderr
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        command + ["--custom-objects", "stop_scenarios"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "reproducible" in proc.stdout and "op: Log at stop_scenarios.py:" in proc.stdout


def test_the_tab_ranks_again_after_a_replay(tmp_path):
    """The tab's causes are cached per version of the run's data; a replay written later (a
    file beside the records) must still reorder them, as it does the report's."""
    import tb_nanwatch

    run = tmp_path / "logs" / "softmax_fp16"
    stopped_run(sc.float16_exp_overflow, run)
    # Without the op inventory, which names the Exp that overflows, the NaN reads as a domain
    # error until the replay says otherwise.
    (run / "nanwatch_ops.json").unlink()
    app = App(tmp_path / "logs")
    before = [d["cause"] for d in app.json("/diagnosis", run="softmax_fp16")["diagnosis"]]
    assert before[0] == "domain_error"
    assert tb_nanwatch.replay(run).verdict == "reproducible"
    after = [d["cause"] for d in app.json("/diagnosis", run="softmax_fp16")["diagnosis"]]
    (entry,) = json.loads(dh.run_cli(tmp_path / "logs", "--json")[1])["runs"]
    assert after[0] == "reduced_precision_overflow"
    assert after == [d["cause"] for d in entry["diagnosis"]]
