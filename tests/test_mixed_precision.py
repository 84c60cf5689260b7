"""Reduced precision: loss-scale skips are not the blow-up; float16 underflow shows as the cause."""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch import reader, stats


@pytest.fixture
def policy():
    def set_policy(name):
        keras.config.set_dtype_policy(name)

    yield set_policy
    keras.config.set_dtype_policy("float32")


def report(logdir, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", str(logdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_healthy_mixed_float16_reports_its_skips_but_no_blow_up(tmp_path, policy):
    policy("mixed_float16")
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) * 300).astype(
        "float32"
    )  # large loss: scaled grads overflow at first
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, dtype="float32", name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "mp"), log_every=4)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    steps_run = 32
    iterations = int(model.optimizer.iterations.numpy())
    skipped = steps_run - iterations  # ground truth: steps the optimizer did not apply
    assert skipped > 0
    code, out, err = report(tmp_path, "--json")
    assert code == 0, err
    run = json.loads(out)["runs"][0]
    assert run["first_nonfinite"] is None
    assert run["loss_scale_skips"][-1]["skips_total"] == skipped
    assert len(run["loss_scale_skips"]) == skipped  # checked every step: each skip has its step
    assert run["steps_watched"] == steps_run  # skipped steps count as steps
    code, text, _ = report(tmp_path)
    assert "loss-scale skips" in text and "not the blow-up" in text
    # Gradient statistics are shown unscaled (the loss scale divided out): comparable to float32 sizes.
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "mp")
    i = rd.site_index("head", "weight_grad", "kernel")
    last = rd.rows[-1, i, stats.STAT_INDEX["max_abs"]]
    scale = float(model.optimizer.dynamic_scale.numpy())
    assert scale > 1 and np.isfinite(last) and last < 1e6


def test_collapsed_loss_scale_is_an_event(tmp_path, policy):
    policy("mixed_float16")
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(1, dtype="float32", name="head"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(), initial_scale=0.25),
        loss="mse",
    )
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "collapsed"), log_every=2)
    model.fit(x, x[:, :1], batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    code, out, _ = report(tmp_path, "--json")
    events = json.loads(out)["runs"][0]["events"]
    assert [e["type"] for e in events] == ["loss_scale_collapse"]
    assert events[0]["loss_scale"] == 0.25


def test_article_d_under_float16_shows_velocity_underflow_before_the_nan(tmp_path, policy):
    policy("float16")
    keras.utils.set_random_seed(0)
    x = tf.random.normal((128 * 4, 784)).numpy()
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 10, 128 * 4), 10)
    model = keras.Sequential(
        [keras.Input((784,))]
        + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy")

    class VelocityAfterStep0(keras.callbacks.Callback):  # ground truth, read on the host
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                velocities = self.model.optimizer._velocities
                self.zero_fraction = float(np.mean([np.mean(v.numpy() == 0) for v in velocities]))

    truth = VelocityAfterStep0()
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "d16"), log_every=4)
    model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=[cb, truth])
    assert truth.zero_fraction > 0.8
    code, out, _ = report(tmp_path, "--json")
    assert code == 1
    run = json.loads(out)["runs"][0]
    assert run["first_nonfinite"]["step"] == 1
    signs = [p for p in run["precursors"] if p["sign"] == "underflow"]
    assert signs and all(p["step"] == 0 for p in signs)
    assert any(
        p["kind"] == "optimizer_state" and p["tensor"].startswith("velocity/") for p in signs
    )
    code, text, _ = report(tmp_path)
    assert re.search(
        r"velocity/kernel (below float16's smallest normal value|exactly 0 \(underflowed)", text
    ), text


def test_bfloat16_sites_have_headroom_and_underflow_against_bfloat16(tmp_path, policy):
    policy("bfloat16")
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    model.compile(optimizer="adam", loss="mse")
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "bf16"), log_every=4)
    model.fit(x, x[:, :4], batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "bf16")
    i = rd.site_index("hidden", "activation")
    assert rd.sites[i]["dtype"] == "bfloat16"
    col = stats.STAT_INDEX
    row = rd.rows[-1, i]
    assert 0 <= row[col["underflow_frac"]] <= 1  # measured for 16-bit floats only
    bf16_max = 3.3895314e38
    assert row[col["headroom"]] == pytest.approx(np.log2(bf16_max / row[col["max_abs"]]), rel=1e-4)
    kernel = rd.site_index("hidden", "weight", "kernel")
    assert np.isnan(rd.rows[-1, kernel, col["underflow_frac"]]) == (
        rd.sites[kernel]["dtype"] != "bfloat16"
    )
