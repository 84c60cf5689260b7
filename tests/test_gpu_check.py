"""bench/gpu_check.py's arithmetic on measured-shaped figures, and its shell wrapper's syntax.

The script itself runs real models (`bash bench/gpu_check.sh --cpu-smoke`, minutes); here only
what turns its timings into the printed ratios, which a slip would silently make wrong.
"""

import inspect
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402

import tb_nanwatch  # noqa: E402


def _fit(step, first=10.0, peak=None):
    return {"first_step_s": first, "median_step_s": step, "peak_bytes": peak}


def _raw(stop):
    modes = ("plain", "record") + (("stop",) if stop else ())
    mib = 2**20
    rounds = [
        {"plain": _fit(0.100, peak=1000 * mib), "record": _fit(0.110, peak=1040 * mib)},
        {"plain": _fit(0.105, peak=1000 * mib), "record": _fit(0.126, peak=1030 * mib)},
    ]
    if stop:
        for r in rounds:
            r["stop"] = _fit(r["plain"]["median_step_s"] * 1.5)
    first = {"plain": _fit(0.1, first=20.0), "record": _fit(0.1, first=30.0)}
    if stop:
        first["stop"] = _fit(0.1, first=40.0)
    return {
        "model": "resnet50",
        "device": "GPU:0",
        "params": 25_000_000,
        "sites": 1210,
        "batch": 32,
        "first": {m: first[m] for m in modes},
        "rounds": rounds,
    }


def test_ratios_are_per_round_against_that_rounds_plain_fit():
    s = gpu_check.summarise(_raw(stop=True))
    assert s["step_ratio_record"] == "1.15 (1.10-1.20)"
    assert s["step_ratio_stop"] == "1.50 (1.50-1.50)"
    assert s["plain_vs_plain"] == "1.05"
    assert (s["first_step_ratio_record"], s["first_step_ratio_stop"]) == ("1.50", "2.00")
    assert (s["peak_plain_mb"], s["memory_added_mb"]) == ("1000 MB", "35.0 MB")


def test_stop_mode_absent_is_skipped_with_a_note():
    s = gpu_check.summarise(_raw(stop=False))
    assert s["step_ratio_stop"] is None and s["first_step_ratio_stop"] is None
    table = gpu_check.render([s], 100.0, False, "Stop mode skipped: no on_nonfinite.")
    row = next(line for line in table.splitlines() if line.startswith("| resnet50"))
    assert row.count("skipped") == 2
    assert table.endswith("one GPU; 100 s in all. Stop mode skipped: no on_nonfinite.")


def test_stop_mode_detection_follows_the_callbacks_signature():
    has = "on_nonfinite" in inspect.signature(tb_nanwatch.NanWatchCallback).parameters
    assert gpu_check.stop_mode_supported() is has


def test_shell_wrapper_parses_and_installs_the_gpu_build():
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert 'tensorflow="tensorflow[and-cuda]==$TF_VERSION"' in text
    assert "keras-hub==$KERAS_HUB_VERSION" in text
