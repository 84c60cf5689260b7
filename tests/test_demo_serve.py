"""`make demo` (demo/serve.py): TensorBoard serves the first run while the rest train, and
Ctrl-C stops both; the demo installs no test tools.

The serve test trains two real demo runs (F, a blow-up in a few seconds, and the float16
variant of B, under a second) into a temp logdir against a real TensorBoard.
"""

import os
import re
import signal
import subprocess
import sys
import time

import plugin_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "demo", "serve.py")


def _processes_mentioning(text, also=""):
    """PIDs of live processes whose command line contains `text` (e.g. a temp logdir) and
    `also`."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and also in cmdline and state != "Z":
            pids.append(int(pid))
    return pids


def test_serves_the_first_run_while_the_rest_train_and_ctrl_c_stops_both(tmp_path):
    logdir = str(tmp_path / "logs")
    port = plugin_helpers.free_port()
    out_path = tmp_path / "serve.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                SERVE,
                "--logdir",
                logdir,
                "--port",
                str(port),
                "--runs",
                "b_float16_x1000,f_huge_data",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT),
            start_new_session=True,
        )
    base = "http://127.0.0.1:%d/data/plugin/nanwatch" % port
    try:

        def runs():
            status, body = plugin_helpers.get(base + "/runs", timeout=5)
            return body.decode() if status == 200 else ""

        def listed(name):
            try:
                return name in runs()
            except OSError:
                return False

        plugin_helpers.wait_for(lambda: listed("f_huge_data"), 180, what="f_huge_data served")
        first = plugin_helpers.get_json(base + "/first_nonfinite?run=f_huge_data")
        assert (first["step"], first["layer"], first["tensor"]) == (3, "dense", "velocity/kernel")
        plugin_helpers.wait_for(lambda: listed("b_float16_x1000"), 180, what="the second run")
        plugin_helpers.wait_for(
            lambda: b"all 2 runs trained" in out_path.read_bytes(), 60, what="the training's end"
        )
        text = out_path.read_text(errors="replace")
        # F first (though listed second), then the rest; TensorBoard was asked to serve first.
        order = [
            text.index("TensorBoard on"),
            text.index("f_huge_data is ready"),
            text.index("training b_float16_x1000"),
        ]
        assert order == sorted(order), text[-3000:]
        assert re.search(
            r"f_huge_data is ready \(\d+ s\): open http://127.0.0.1:%d/#nanwatch" % port, text
        )
        assert _processes_mentioning(logdir), "TensorBoard should still be serving"
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            status = proc.wait(timeout=30)
        finally:
            leftover = _processes_mentioning(logdir)
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
    assert status == 130
    assert leftover == [], "still running after Ctrl-C: %s" % leftover


def test_ctrl_c_while_the_first_run_trains_stops_the_training(tmp_path):
    logdir = str(tmp_path / "logs")
    proc = subprocess.Popen(
        [sys.executable, SERVE, "--logdir", logdir, "--port", str(plugin_helpers.free_port())],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT),
        start_new_session=True,
    )
    try:
        plugin_helpers.wait_for(
            lambda: _processes_mentioning(logdir, also="run_all.py"),
            60,
            what="the training process",
        )
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            status = proc.wait(timeout=30)
        finally:
            leftover = _processes_mentioning(logdir)
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
    assert status == 130
    assert leftover == []


def test_demo_installs_no_test_tools():
    """`make demo` installs requirements-demo.txt (TensorFlow, TensorBoard), never the test
    requirements (pytest, playwright, ruff)."""
    with open(os.path.join(ROOT, "requirements-demo.txt")) as f:
        wanted = {
            re.split(r"[=<>\[ ]", line.strip())[0].lower()
            for line in f
            if line.strip() and not line.startswith("#")
        }
    assert wanted == {"tensorflow-cpu", "tensorboard"}
    dry = subprocess.run(
        ["make", "-n", "demo", "VENV=/nonexistent-venv", "PORT=6099"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert "requirements-demo.txt" in dry.stdout
    assert "requirements-test.txt" not in dry.stdout
    assert "demo/serve.py --port 6099" in dry.stdout
