"""The writer names the producer of the first non-finite value: right step, kind and layer,
checked against ground truths established without the writer."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import writer_scenarios as sc

import tb_nanwatch
from tb_nanwatch import reader, stats, summary

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def fit_watched(tmp_path, scenario, name="run", epochs=1, jit_compile=False, **options):
    build, x, y, loss, _ = scenario()
    model = build()
    model.compile(optimizer="adam", loss=loss, jit_compile=jit_compile)
    counter = sc.BatchCounter()
    observer = sc.HostObserver()
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / name), **options)
    model.fit(
        x,
        y,
        batch_size=sc.BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback, counter, observer],
    )
    return model, callback, counter, observer


def report_json(logdir):
    """`tb-nanwatch report LOGDIR --json`, the CLI users script against."""
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", str(logdir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return {r["run"]: r["first_nonfinite"] for r in json.loads(proc.stdout)["runs"]}


def read(logdir, run="run"):
    provider, ctx, eid = reader.open_logdir(str(logdir))
    return reader.read_run(provider, ctx, eid, run)


def test_forward_op_in_a_middle_layer(tmp_path):
    truth = sc.check_numerics_ground_truth(*sc.forward_exp()[:4], sc.forward_exp()[4])
    assert truth[:3] == (5, "exp_layer", "Exp"), truth
    fit_watched(tmp_path, sc.forward_exp, log_every=4)
    first = report_json(tmp_path)["run"]
    assert (first["step"], first["layer"], first["kind"]) == (truth[0], truth[1], "activation")
    assert first["posinf"] > 0 and first["nan"] == 0
    # What it reached in the same step is listed as propagation, not as the origin.
    assert any(p["layer"] == "out" and p["kind"] == "activation" for p in first["propagators"])


def test_backward_only_op(tmp_path):
    truth = sc.check_numerics_ground_truth(*sc.backward_sqrt()[:4], sc.backward_sqrt()[4])
    assert truth[:3] == (0, "sqrt", "SqrtGrad"), truth
    _, callback, _, _ = fit_watched(tmp_path, sc.backward_sqrt, log_every=4)
    first = report_json(tmp_path)["run"]
    # The forward pass is finite; the gradient w.r.t. hidden's output is the first non-finite
    # tensor, computed by the backward pass of the sqrt layer that consumed it.
    assert (first["step"], first["kind"], first["layer"]) == (truth[0], "activation_grad", "hidden")
    assert first["backward_of"] == [truth[1]]
    rd = read(tmp_path)
    col = stats.STAT_INDEX
    for i, site in enumerate(rd.sites):
        if site["kind"] in ("input", "activation", "loss"):
            assert rd.flight_rows[-1][i, col["nan"]] + rd.flight_rows[-1][i, col["posinf"]] == 0, (
                site
            )


def test_loss(tmp_path):
    truth = sc.check_numerics_ground_truth(*sc.loss_log()[:4], sc.loss_log()[4])
    assert truth[0] == 0 and truth[1] is None and truth[2] == "Log", (
        truth
    )  # an op of the loss, no layer
    fit_watched(tmp_path, sc.loss_log, log_every=4)
    first = report_json(tmp_path)["run"]
    assert (first["step"], first["kind"]) == (truth[0], "loss")
    assert first["layer"].startswith("sequential")  # the model's name: the loss belongs to no layer


def test_optimizer_update_scenario_f(tmp_path):
    model, callback, counter, observer = fit_watched(tmp_path, sc.adam_velocity, log_every=5)
    # The host observer saw Adam's velocity of the kernel go non-finite first.
    assert observer.first is not None and observer.first[1].endswith("kernel_velocity"), (
        observer.first
    )
    first = report_json(tmp_path)["run"]
    assert (first["step"], first["layer"], first["kind"], first["tensor"]) == (
        observer.first[0],
        "dense",
        "optimizer_state",
        "velocity/kernel",
    )
    assert (first["nan"], first["posinf"], first["neginf"]) == (0, 1, 0)
    # Weights and loss turn non-finite only later: the row data shows the order.
    rd = read(tmp_path)
    first_steps = {
        summary.site_label(s): rd.rows[:, i, stats.STAT_INDEX["first_nonfinite_step"]]
        for i, s in enumerate(rd.sites)
    }
    weight_first = np.nanmin(first_steps["dense/weight/kernel"])
    loss_first = np.nanmin(first_steps["%s/loss" % model.name])
    assert weight_first > first["step"] and loss_first > first["step"]


def test_float16_overflow(tmp_path):
    truth = sc.check_numerics_ground_truth(*sc.float16_overflow()[:4], sc.float16_overflow()[4])
    assert truth[:2] == (0, "big_init"), truth
    fit_watched(tmp_path, sc.float16_overflow, log_every=4)
    first = report_json(tmp_path)["run"]
    assert (first["step"], first["layer"], first["kind"]) == (0, "big_init", "activation")
    rd = read(tmp_path)
    site = rd.site_index("big_init", "activation")
    assert rd.sites[site]["dtype"] == "float16"
    assert first["posinf"] > 0


def test_healthy_run_reports_null_and_true_statistics(tmp_path):
    model, callback, counter, _ = fit_watched(tmp_path, sc.healthy, epochs=2, log_every=5)
    assert report_json(tmp_path) == {"run": None}
    rd = read(tmp_path)
    steps_run = counter.started
    assert steps_run == 24
    # Every step is in exactly one row: step 0 alone (the starting state), then rows ending
    # every 5 steps, and the last partial row.
    assert rd.steps.tolist() == [0, 4, 9, 14, 19, 23]
    assert rd.rows[:, 0, stats.STAT_INDEX["steps"]].tolist() == [1, 4, 5, 5, 5, 4]
    # The sampled statistics of the last row are those of the final weights.
    kernel = model.get_layer("hidden").kernel.numpy()
    i = rd.site_index("hidden", "weight", "kernel")
    last = rd.rows[-1, i]
    col = stats.STAT_INDEX
    np.testing.assert_allclose(last[col["max_abs"]], np.abs(kernel).max(), rtol=1e-6)
    np.testing.assert_allclose(last[col["mean"]], kernel.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(last[col["norm"]], np.linalg.norm(kernel), rtol=1e-5)
    assert last[col["size"]] == kernel.size
    assert np.log2(float(np.finfo(np.float32).max) / float(np.abs(kernel).max())) == pytest.approx(
        last[col["headroom"]], rel=1e-5
    )
    # Every kind is present (but sample weights: fit() got none), in execution order.
    kinds = [s["kind"] for s in rd.sites]
    assert [k for k in stats.KINDS if k in kinds] == [
        k for k in stats.KINDS if k != "sample_weight"
    ]
    assert kinds.index("target") < kinds.index("loss")
    assert kinds.index("loss") > max(i for i, k in enumerate(kinds) if k == "activation")
    # Keras computes BCE from the sigmoid's logits: head's output is off the gradient path.
    head_grad = rd.site_index("head", "activation_grad")
    assert rd.rows[-1, head_grad, col["size"]] == 0
    assert rd.rows[-1, rd.site_index("hidden", "activation_grad"), col["size"]] == sc.BATCH * 8


def test_rows_aggregate_without_losing_the_nonfinite_step(tmp_path):
    build, x, y, loss, _ = sc.healthy()
    x, y = np.concatenate([x, x[:32]]), np.concatenate([y, y[:32]])  # 16 batches an epoch
    x[13 * sc.BATCH + 2, 3] = np.nan  # one NaN in the batch of step 13
    model = build()
    model.compile(optimizer="sgd", loss=loss)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=10, flight_steps=4)
    model.fit(x, y, batch_size=sc.BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    rd = read(tmp_path)
    col = stats.STAT_INDEX
    i = rd.site_index(model.name, "input")
    row = list(rd.steps).index(19)
    assert rd.rows[row, i, col["first_nonfinite_step"]] == 13
    assert rd.rows[row, i, col["nan"]] == 1 and rd.rows[row, i, col["nonfinite_steps"]] == 1
    assert rd.rows[0, i, col["nan"]] == 0  # steps 0-9: clean
    # Second epoch: the same batch at step 29 is counted too (counts are summed, never sampled).
    assert rd.rows[list(rd.steps).index(29), i, col["nan"]] == 1
    first = reader.first_nonfinite_json(rd)
    assert (first["step"], first["kind"], first["nan"]) == (13, "input", 1)
    # The flight recorder holds the 4 steps up to the first non-finite one, at step resolution.
    assert rd.flight_steps.tolist() == [10, 11, 12, 13]
    assert rd.flight_rows[-1, i, col["nan"]] == 1 and rd.flight_rows[0, i, col["nan"]] == 0


def test_jit_compile_gives_the_same_answer(tmp_path):
    fit_watched(tmp_path, sc.adam_velocity, name="xla", jit_compile=True, log_every=5)
    fit_watched(tmp_path, sc.adam_velocity, name="graph", jit_compile=False, log_every=5)
    got = report_json(tmp_path)
    assert got["xla"] is not None
    for key in ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf"):
        assert got["xla"][key] == got["graph"][key], key
    assert got["xla"]["tensor"] == "velocity/kernel"


def test_custom_loop_with_tf_function(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.MeanSquaredError()
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=3)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = watch.record_loss(loss_fn(y, model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    stopped_at = None
    for step in range(10):
        x = rng.normal(size=(4, 6)).astype("float32")
        if step == 6:
            x[1, 2] = np.inf
        train_step(tf.constant(x), tf.zeros((4, 1)))
        if watch.after_step():
            stopped_at = step
            break
    watch.close()
    assert stopped_at == 6
    first = report_json(tmp_path)["run"]
    assert (first["step"], first["kind"], first["posinf"]) == (6, "input", 1)
    rd = read(tmp_path)
    assert rd.site_index(model.name, "loss") is not None
    assert rd.steps.tolist() == [0, 2, 5, 6]
    # close() restored the model: calling it no longer goes through the watch.
    assert "call" not in vars(model)


def test_nested_functional_and_subclassed_layer_paths(tmp_path):
    keras.utils.set_random_seed(0)

    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.dense = keras.layers.Dense(4, name="dense")

        def call(self, x):
            return tf.nn.relu(self.dense(x))

    inner_in = keras.Input((4,))
    encoder = keras.Model(inner_in, Block(name="block_2")(inner_in), name="encoder")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(encoder(inputs)), name="outer")
    model.compile(optimizer="adam", loss="mse")
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=2)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    labels = [summary.site_label(s) for s in cb.watch.sites]
    assert "encoder/block_2/dense/activation" in labels
    assert "encoder/block_2/dense/weight_grad/kernel" in labels
    assert "encoder/block_2/dense/optimizer_state/velocity/kernel" in labels
    forward = [l for l in labels if l.endswith("/activation")]
    assert forward.index("encoder/block_2/dense/activation") < forward.index("head/activation")
    # No graph op names anywhere.
    assert not any("BiasAdd" in l or "MatMul" in l for l in labels)


def test_lean_setting_and_stop_mode(tmp_path):
    build, x, y, loss, _ = sc.forward_exp()
    model = build()
    model.compile(optimizer="adam", loss=loss)
    counter = sc.BatchCounter()
    cb = tb_nanwatch.NanWatchCallback(
        str(tmp_path / "run"),
        log_every=4,
        on_nonfinite="stop",
        kinds=("input", "activation", "loss", "activation_grad", "weight_grad"),
    )
    model.fit(
        x, y, batch_size=sc.BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[cb, counter]
    )
    assert counter.started == 6  # stopped right after step 5, the first non-finite
    assert {s["kind"] for s in cb.watch.sites} == {
        "input",
        "activation",
        "loss",
        "activation_grad",
        "weight_grad",
    }
    assert report_json(tmp_path)["run"]["step"] == 5


def test_bad_arguments_get_clear_errors(tmp_path):
    model = sc.healthy()[0]()
    with pytest.raises(ValueError, match="optimizer"):
        tb_nanwatch.Watch(str(tmp_path), model)
    with pytest.raises(ValueError, match="unknown kinds"):
        tb_nanwatch.Watch(str(tmp_path), model, keras.optimizers.SGD(), kinds=("weights",))
    with pytest.raises(ValueError, match="log_every"):
        tb_nanwatch.Watch(str(tmp_path), model, keras.optimizers.SGD(), log_every=0)


CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, keras, tb_nanwatch
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(160, 6)).astype("float32")
    x[7 * 8 + 3, 1] = np.nan                      # the batch of step 7
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="head")])
    model.compile(optimizer="adam", loss="mse")

    class KillAfterFirstNonfinite(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 8:                        # right after the first non-finite step
                os.kill(os.getpid(), signal.SIGKILL)

    model.fit(x, x[:, :1], batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[tb_nanwatch.NanWatchCallback(sys.argv[1], log_every=100), KillAfterFirstNonfinite()])
""")


def test_sigkill_right_after_the_first_nonfinite_step_leaves_the_evidence(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "killed")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = report_json(tmp_path)["killed"]
    assert (first["step"], first["kind"], first["nan"]) == (7, "input", 1)


def test_embedding_gradients_are_read_sparse(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(1000, 4, name="embed"),
            keras.layers.GlobalAveragePooling1D(name="pool"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    tokens = np.random.default_rng(0).integers(0, 1000, size=(64, 5)).astype("int32")
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    model.fit(tokens, np.zeros((64, 1), "float32"), batch_size=8, verbose=0, callbacks=[cb])
    rd = read(tmp_path)
    col = stats.STAT_INDEX
    # Integer token ids are not a float site; the embedding's gradient holds its 8x5 looked-up rows.
    assert rd.site_index(model.name, "input") is None
    grad = rd.site_index("embed", "weight_grad", "embeddings")
    assert rd.rows[-1, grad, col["size"]] == 8 * 5 * 4
    assert rd.rows[-1, rd.site_index("embed", "weight", "embeddings"), col["size"]] == 1000 * 4
    assert reader.first_nonfinite_json(rd) is None


def _one_step_row(tmp_path, model, site, x, y):
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=1)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[cb])
    rd = read(tmp_path)
    return rd.rows[0, rd.site_index(*site)]


def test_nonfinite_elements_are_not_counted_as_underflow(tmp_path):
    keras.config.set_dtype_policy("float16")
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
        model.layers[0].kernel.assign(np.array([[np.nan, 1.0]] * 4, "float16"))
        row = _one_step_row(
            tmp_path,
            model,
            ("d", "weight", "kernel"),
            np.ones((8, 4), "float32"),
            np.ones((8, 2), "float32"),
        )
    finally:
        keras.config.set_dtype_policy("float32")
    col = stats.STAT_INDEX
    assert row[col["nan"]] == 4 and row[col["underflow_frac"]] == 0 and row[col["zero_frac"]] == 0


def test_norm_and_std_of_huge_finite_float32_values_stay_finite(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    model.layers[0].kernel.assign(np.full((4, 2), 1e20, "float32"))  # squares overflow float32
    row = _one_step_row(
        tmp_path,
        model,
        ("d", "weight", "kernel"),
        np.zeros((8, 4), "float32"),
        np.zeros((8, 2), "float32"),
    )
    col = stats.STAT_INDEX
    assert row[col["posinf"]] == 0
    np.testing.assert_allclose(row[col["norm"]], np.sqrt(8) * 1e20, rtol=1e-6)
    np.testing.assert_allclose(row[col["mean"]], 1e20, rtol=1e-6)
    assert row[col["std"]] < 1e15  # all equal: no spread (float64 cancellation aside)


def test_model_called_twice_in_one_step_keeps_both_calls(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    optimizer = keras.optimizers.SGD(0.01)
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=1)

    @tf.function
    def train_step(a, b):
        with tf.GradientTape() as tape:  # e.g. a siamese pair
            loss = watch.record_loss(
                tf.reduce_mean(tf.square(model(a, training=True) - model(b, training=True)))
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    a = np.ones((4, 3), "float32")
    a[0, 0] = np.nan  # only in the first call's input
    train_step(tf.constant(a), tf.ones((4, 3)))
    watch.after_step()
    watch.close()
    first = reader.first_nonfinite_json(read(tmp_path))
    assert (first["kind"], first["nan"]) == ("input", 1)
    rd = read(tmp_path)
    assert rd.rows[0, rd.site_index(model.name, "input"), stats.STAT_INDEX["size"]] == 2 * 4 * 3


def _regression(tmp_path, name, learning_rate, epochs):
    """Least squares by SGD: the curvature is 2, so the iteration diverges for a learning
    rate above 1, geometrically (|1 - 2 lr| per step), and overflows float32 a few hundred
    steps later."""
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(512, 4)).astype("float32")
    y = (x @ np.ones((4, 1))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate), loss="mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / name), log_every=50)
    losses = keras.callbacks.History()
    model.fit(
        x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0, callbacks=[callback, losses]
    )
    return callback.watch, losses.history["loss"]


def test_early_warning_comes_well_before_a_gradual_overflow(tmp_path):
    watch, _ = _regression(tmp_path, "diverging", 1.08, 14)
    first = watch.first_nonfinite
    warning = watch.early_warning
    assert first is not None and warning is not None
    assert first["step"] - warning["step"] >= 20
    assert warning["predicted_step"] > warning["step"]
    # On disk: an event the tab marks and --json reports.
    data = read(tmp_path, "diverging")
    events = [e for e in data.events if e.get("type") == "early_warning"]
    assert [e["step"] for e in events] == [warning["step"]]
    assert (events[0]["layer"], events[0]["kind"]) == (warning["layer"], warning["kind"])


def test_no_early_warning_when_training_converges(tmp_path):
    watch, history = _regression(tmp_path, "converging", 0.9, 14)  # |1 - 2 lr| < 1
    assert watch.first_nonfinite is None and watch.early_warning is None
    assert history[-1] < history[0]
