"""tf.distribute: statistics combined over replicas, one writer per worker, the replica/worker
that saw the first non-finite value named.  Real strategies in fresh processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tb_nanwatch import reader, stats

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def report_json(logdir):
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", str(logdir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return {r["run"]: r for r in json.loads(proc.stdout)["runs"]}


def test_mirrored_strategy_fit_and_custom_loop(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed", "mirrored.py"), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    truth = json.loads(proc.stdout.split("RESULT ")[1])
    runs = report_json(tmp_path)
    fit = runs["fit"]["first_nonfinite"]
    assert (fit["step"], fit["kind"], fit["nan"]) == (5, "input", 1)
    assert (fit["replica"], fit["replicas"]) == (1, [1])
    loop = runs["loop"]["first_nonfinite"]
    assert (loop["step"], loop["kind"], loop["posinf"], loop["replica"]) == (2, "input", 1, 0)
    # Written once per step for the whole global batch: sizes add up, extremes span both replicas.
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "fit")
    i = rd.site_index(rd.sites[0]["layer"], "input")
    col = stats.STAT_INDEX
    assert rd.steps[0] == 0 and rd.rows[0, i, col["size"]] == 16 * 8
    np.testing.assert_allclose(
        rd.rows[0, i, col["max_abs"]], truth["fit_input_max_abs_step0"], rtol=1e-6
    )
    assert rd.rows[:, i, col["nan"]].sum() == 1  # counted once, not once per replica


def test_second_mirrored_strategy_in_one_process(tmp_path):
    """A plain fit under one MirroredStrategy, then the callback under a second (the watch's
    all-gathers once took the collective instance numbers the first strategy had used for its
    all-reduces), a plain fit under a third, and the callback again under a fourth, on a model
    with more calls than the device state made before tracing has room for."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed", "two_strategies.py"), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ")[1])
    assert out["second_sites"] > 0
    assert out["weights_equal"], "the watched fit trained differently from the plain one"
    runs = report_json(tmp_path)
    assert runs["second"]["first_nonfinite"] is None
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "second")
    assert list(rd.steps) == [0, 1, 3, 5]  # 6 steps of 16: every row written
    first = runs["fourth"]["first_nonfinite"]
    assert (first["step"], first["kind"], first["nan"], first["replicas"]) == (3, "input", 1, [1])
    assert out["fourth_first"]["layer"] == first["layer"]
    # More sites than planned before tracing: the state was made again, in the cross-replica
    # context, and every call is watched.
    assert out["fourth_sites"] > out["fourth_planned"]
    assert out["fourth_activations"] == ["hidden", "repeat/inner"] + [
        "repeat/inner (call %d)" % n for n in range(2, 9)
    ] + ["repeat", "head"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_mirrored_strategy_names_the_worker(tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": ["127.0.0.1:%d" % p for p in ports]}
    procs = []
    for index in range(2):
        env = dict(
            ENV,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(HERE, "distributed", "multi_worker.py"),
                    str(tmp_path),
                    "1",
                    "3",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for out, err in outputs:
        assert "RESULT" in out, err[-3000:]
    runs = report_json(tmp_path)
    assert set(runs) == {"worker_0", "worker_1"}  # one run per worker, nothing clobbered
    for name, run in runs.items():
        first = run["first_nonfinite"]
        assert (first["step"], first["kind"], first["posinf"]) == (3, "input", 1), name
        assert first["worker"] == "worker_1", name
