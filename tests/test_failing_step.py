"""The whole loop on one real model: train in stop mode -> report (bundle, the producer's ops
in the user's code) -> replay from the command line -> the report and the tab say what the
replay found."""

import contextlib
import inspect
import io
import json
import os

import damage_helpers as dh
import stop_scenarios as sc
from test_plugin_backend import App
from test_replay import stopped_run


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

    rc, text, _ = dh.run_cli(tmp_path / "logs")
    assert "op Log at %s, reproducible on replay" % where in text
    (entry,) = json.loads(dh.run_cli(tmp_path / "logs", "--json")[1])["runs"]
    assert entry["replay"]["verdict"] == "reproducible"
    # The tab's /diagnosis says the same.
    answer = App(tmp_path / "logs").json("/diagnosis", run="log_of_zero")
    assert answer["failing_step"]["replay"]["op"]["type"] == "Log"
    assert answer["failing_step"]["bundle"]["step"] == 4
