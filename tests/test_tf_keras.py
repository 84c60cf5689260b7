"""tf_keras (Keras 2): the callback and Watch give the record they give on Keras 3, and training
with them is bitwise the plain tf_keras fit.  Small models only; the tf_keras.applications
matrix is bench/tf_keras_models.py."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import writer_scenarios as sc

import tb_nanwatch
from tb_nanwatch import reader, stats, summary
from tb_nanwatch.watch import flavour

tf_keras = pytest.importorskip("tf_keras")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


class Steps(tf_keras.callbacks.Callback):
    """Ground truth from outside the writer: the batches started, and after each batch the
    first step at which an optimizer slot or weight held a NaN/Inf (read on the host)."""

    def __init__(self):
        super().__init__()
        self.started = 0
        self.first = None  # (step, variable name)

    def on_train_batch_begin(self, batch, logs=None):
        self.started += 1

    def on_train_batch_end(self, batch, logs=None):
        if self.first is None:
            for v in optimizer_variables(self.model.optimizer) + self.model.trainable_variables:
                value = v.numpy()
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    self.first = (self.started - 1, v.name)
                    break


def optimizer_variables(optimizer):
    """A property on tf_keras's optimizers, a method on the legacy ones."""
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def snapshot(model):
    return [v.numpy().tobytes() for v in model.variables + optimizer_variables(model.optimizer)]


def report_json(logdir):
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", str(logdir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return {r["run"]: r for r in json.loads(proc.stdout)["runs"]}


def labels(sites):
    return [(s["layer"], s["kind"], s["tensor"], s["dtype"], s["shape"]) for s in sites]


def assert_unwrapped(model, optimizer):
    for name in ("call", "train_step", "compute_loss"):
        assert name not in vars(model), name
    for layer in model._flatten_layers(include_self=False):
        assert "call" not in vars(layer), layer.name
    for name in ("apply_gradients", "apply"):
        assert name not in vars(optimizer), name


def scenario_f_models():
    """The articles' scenario F (data uniform in +-1e10, Dense(1), adam, mse) on both Kerases
    with the same data and the same initial weights (the two libraries' initializers draw
    differently)."""
    keras.utils.set_random_seed(0)
    x = tf.random.uniform((1000, 1), minval=-1e10, maxval=1e10).numpy()
    y = tf.random.uniform((1000, 1), minval=-1e10, maxval=1e10).numpy()
    k3 = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")], name="f")
    k2 = tf_keras.Sequential(
        [tf_keras.Input((1,)), tf_keras.layers.Dense(1, name="dense")], name="f"
    )
    k2.set_weights(k3.get_weights())
    return k3, k2, x, y


def fit(model, x, y, callbacks, epochs=1, batch_size=sc.BATCH):
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks
    )


def test_scenario_f_same_record_as_keras3_and_bitwise_plain_fit(tmp_path):
    k3, k2, x, y = scenario_f_models()
    k3.compile(optimizer="adam", loss="mse")
    k2.compile(optimizer="adam", loss="mse")
    cb3 = tb_nanwatch.NanWatchCallback(str(tmp_path / "k3"), log_every=5)
    cb2 = tb_nanwatch.NanWatchCallback(str(tmp_path / "k2"), log_every=5)
    steps = Steps()
    fit(k3, x, y, [cb3], batch_size=32)
    fit(k2, x, y, [cb2, steps], batch_size=32)

    # The host saw Adam's velocity of the kernel go non-finite first, after two finite steps.
    assert steps.first == (2, "v/dense/kernel:0"), steps.first
    runs = report_json(tmp_path)
    first2, first3 = runs["k2"]["first_nonfinite"], runs["k3"]["first_nonfinite"]
    assert (first2["step"], first2["layer"], first2["kind"], first2["tensor"]) == (
        2,
        "dense",
        "optimizer_state",
        "velocity/kernel",
    )
    assert (first2["nan"], first2["posinf"], first2["neginf"]) == (0, 1, 0)
    keys = ("step", "layer", "kind", "tensor", "nan", "posinf", "neginf", "propagators")
    assert {k: first2[k] for k in keys} == {k: first3[k] for k in keys}
    # The same sites, in the same order, under the same names.
    assert labels(cb2.watch.sites) == labels(cb3.watch.sites)
    # The same rows: steps, which sites went non-finite when, and the statistics.
    rd2 = reader.read_run(*reader.open_logdir(str(tmp_path)), "k2")
    rd3 = reader.read_run(*reader.open_logdir(str(tmp_path)), "k3")
    assert rd2.steps.tolist() == rd3.steps.tolist()
    col = stats.STAT_INDEX
    for name in ("first_nonfinite_step", "nan", "posinf", "neginf", "size"):
        np.testing.assert_array_equal(rd2.rows[..., col[name]], rd3.rows[..., col[name]])
    np.testing.assert_allclose(
        rd2.rows[..., col["max_abs"]], rd3.rows[..., col["max_abs"]], rtol=1e-5
    )
    assert rd2.flight_steps.tolist() == rd3.flight_steps.tolist() == [0, 1, 2]
    # Weights and loss go non-finite later: the loss two steps late.
    firsts = {
        summary.site_label(s): np.fmin.reduce(rd2.rows[:, i, col["first_nonfinite_step"]])
        for i, s in enumerate(rd2.sites)
    }
    assert firsts["dense/weight/kernel"] == 3 and firsts["f/loss"] == 4

    # Training with the callback is plain tf_keras fit, bit for bit; everything is unwrapped.
    _, plain, _, _ = scenario_f_models()
    plain.compile(optimizer="adam", loss="mse")
    fit(plain, x, y, [], batch_size=32)
    assert snapshot(plain) == snapshot(k2)
    assert_unwrapped(k2, k2.optimizer)


def mlp(activation_scale=1.0):
    tf_keras.utils.set_random_seed(0)
    return tf_keras.Sequential(
        [
            tf_keras.Input((4,)),
            tf_keras.layers.Dense(16, activation="relu", name="hidden"),
            tf_keras.layers.Lambda(tf.exp, name="exp_layer"),
            tf_keras.layers.Dense(1, name="out"),
        ]
    )


def exp_data():
    """+Inf made by exp of large values in a middle layer, at step 5."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    x[40:48] *= 1000.0
    return x, np.zeros((64, 1), "float32")


@pytest.mark.parametrize("optimizer", ["adam", "legacy_adam"])
def test_mlp_blow_up_named_right_and_bitwise_plain_fit(tmp_path, optimizer):
    x, y = exp_data()

    def make():
        if optimizer == "adam":
            return tf_keras.optimizers.Adam(1e-3)
        return tf_keras.optimizers.legacy.Adam(1e-3)

    plain = mlp()
    plain.compile(optimizer=make(), loss="mse")
    fit(plain, x, y, [], epochs=2)
    model = mlp()
    model.compile(optimizer=make(), loss="mse")
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    steps = Steps()
    fit(model, x, y, [cb, steps], epochs=2)
    first = cb.watch.first_nonfinite
    # Batch 5 holds the x1000 rows; exp overflows in the forward pass.
    assert (first["step"], first["layer"], first["kind"]) == (5, "exp_layer", "activation")
    assert first["posinf"] > 0 and first["nan"] == 0
    assert any(p["layer"] == "out" and p["kind"] == "activation" for p in first["propagators"])
    names = [summary.site_label(s) for s in cb.watch.sites]
    # Slots named as on Keras 3, for the new and the legacy optimizers alike.
    assert "hidden/optimizer_state/velocity/kernel" in names
    assert "out/weight_grad/bias" in names
    assert snapshot(plain) == snapshot(model)
    assert_unwrapped(model, model.optimizer)
    if optimizer == "adam":
        # After fit: evaluate, predict, save and load give plain fit's numbers (NaN by now).
        xs = x[:16]

        def same(a, b):
            return np.asarray(a).tobytes() == np.asarray(b).tobytes()

        assert same(model.evaluate(xs, y[:16], verbose=0), plain.evaluate(xs, y[:16], verbose=0))
        assert same(model.predict(xs, verbose=0), plain.predict(xs, verbose=0))
        # (tf_keras cannot save a Lambda(tf.exp) model whole, watched or not: weights only.)
        model.save_weights(tmp_path / "watched.h5")
        loaded = mlp()
        loaded.load_weights(tmp_path / "watched.h5")
        assert [v.numpy().tobytes() for v in loaded.variables] == [
            v.numpy().tobytes() for v in plain.variables
        ]
    # A second fit() with the same callback reuses the instrumented function and keeps going.
    fit(model, x, y, [cb])
    assert cb.watch.first_nonfinite["step"] == 5


@pytest.mark.parametrize(
    "mode", [{"jit_compile": True}, {"run_eagerly": True}, {"steps_per_execution": 4}]
)
def test_compile_modes_named_right_and_bitwise(tmp_path, mode):
    x, y = exp_data()
    runs = []
    for watched in (False, True):
        model = mlp()
        model.compile(optimizer="adam", loss="mse", **mode)
        cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
        fit(model, x, y, [cb] if watched else [])
        runs.append(snapshot(model))
    first = cb.watch.first_nonfinite
    assert (first["step"], first["layer"], first["kind"]) == (5, "exp_layer", "activation")
    assert runs[0] == runs[1]


def test_nested_functional_and_subclassed_paths_match_keras3(tmp_path):
    """Layer paths by the user's names, as on Keras 3; a subclassed layer's Python control flow
    on tensors still runs through autograph (tf_keras converts `call` itself)."""

    def build(lib):
        class Block(lib.layers.Layer):
            def __init__(self, **kw):
                super().__init__(**kw)
                self.dense = lib.layers.Dense(4, name="dense")

            def call(self, x):
                y = self.dense(x)
                # A tensor condition: tf_keras runs call through autograph, which makes it a
                # tf.cond (Keras 3 cannot build such a layer functionally).
                if lib is tf_keras and tf.reduce_sum(y) > 0:
                    y = tf.nn.relu(y)
                return y

        inner_in = lib.Input((4,))
        encoder = lib.Model(inner_in, Block(name="block_2")(inner_in), name="encoder")
        inputs = lib.Input((4,))
        head = lib.layers.Dense(1, name="head")(encoder(inputs))
        model = lib.Model(inputs, head, name="outer")
        model.compile(optimizer="adam", loss="mse")
        return model

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    sites = {}
    for name, lib in (("k3", keras), ("k2", tf_keras)):
        model = build(lib)
        cb = tb_nanwatch.NanWatchCallback(str(tmp_path / name), log_every=2)
        model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[cb])
        sites[name] = labels(cb.watch.sites)
    names = [summary.site_label(dict(zip(("layer", "kind", "tensor"), s))) for s in sites["k2"]]
    assert "encoder/block_2/dense/activation" in names
    assert "encoder/block_2/dense/optimizer_state/velocity/kernel" in names
    assert sites["k2"] == sites["k3"]


def test_custom_loop_watch_with_apply_gradients(tmp_path):
    x, y = exp_data()
    model = mlp()
    optimizer = tf_keras.optimizers.SGD(0.01)
    watch = tb_nanwatch.Watch(str(tmp_path / "loop"), model, optimizer, log_every=2)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = watch.record_loss(tf.reduce_mean(tf.square(model(xb, training=True) - yb)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    stopped = None
    for step in range(8):
        train_step(x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8])
        if watch.after_step():
            stopped = step
            break
    watch.close()
    assert stopped == 5
    first = watch.first_nonfinite
    assert (first["step"], first["layer"], first["kind"]) == (5, "exp_layer", "activation")
    kinds = {s["kind"] for s in watch.sites}
    # Plain SGD keeps no slot; a custom loop's targets are watched only through record_targets.
    assert kinds == set(stats.KINDS) - {"optimizer_state", "target", "sample_weight"}
    assert_unwrapped(model, optimizer)


def test_unsupported_optimizer_raises_before_anything_is_wrapped(tmp_path):
    x, y = exp_data()
    model = mlp()
    model.compile(optimizer=tf.compat.v1.train.GradientDescentOptimizer(0.01), loss="mse")
    assert type(model.optimizer).__name__ == "TFOptimizer"
    with pytest.raises(flavour.UnsupportedError, match="TF1 tf.compat.v1.train optimizer"):
        fit(model, x, y, [tb_nanwatch.NanWatchCallback(str(tmp_path / "fit"))])
    assert_unwrapped(model, model.optimizer)
    with pytest.raises(flavour.UnsupportedError, match="Nothing was wrapped"):
        tb_nanwatch.Watch(str(tmp_path / "watch"), model, model.optimizer)
    assert_unwrapped(model, model.optimizer)
    # Not a Keras model at all.
    with pytest.raises(flavour.UnsupportedError, match="neither a Keras 3"):
        tb_nanwatch.Watch(str(tmp_path / "module"), tf.Module(), keras.optimizers.SGD())
    # The model trains as before.
    fit(model, x[:8], y[:8], [])


@pytest.mark.parametrize("legacy", [False, True])
def test_mixed_float16_skips_are_not_the_blow_up_and_gradients_are_unscaled(tmp_path, legacy):
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf_keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
        y = (x.sum(axis=1, keepdims=True) * 300).astype("float32")  # scaled grads overflow
        model = tf_keras.Sequential(
            [
                tf_keras.Input((8,)),
                tf_keras.layers.Dense(16, activation="relu", name="hidden"),
                tf_keras.layers.Dense(1, dtype="float32", name="head"),
            ]
        )
        adam = tf_keras.optimizers.legacy.Adam() if legacy else tf_keras.optimizers.Adam()
        model.compile(optimizer=adam, loss="mse")
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    optimizer = model.optimizer
    assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    initial = float(optimizer.initial_scale)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path / "mp"), log_every=4)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[cb])
    # Ground truth: each skip halves the dynamic scale (it grows only after 2000 good steps).
    skipped = int(round(np.log2(initial / float(optimizer.loss_scale.numpy()))))
    assert skipped > 0
    run = report_json(tmp_path)["mp"]
    assert run["first_nonfinite"] is None
    assert run["loss_scale_skips"][-1]["skips_total"] == skipped
    assert run["steps_watched"] == 32
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "mp")
    assert rd.sites[rd.site_index("hidden", "activation")]["dtype"] == "float16"
    # tf_keras unscales weight gradients before apply_gradients; the gradient w.r.t. a layer's
    # output comes from the scaled loss: both are shown in the loss's units.
    scale = float(optimizer.loss_scale.numpy())
    assert scale > 10  # so that a statistic left scaled, or unscaled twice, shows
    col = stats.STAT_INDEX
    weight_grad = rd.rows[-1, rd.site_index("head", "weight_grad", "kernel"), col["max_abs"]]
    output_grad = rd.rows[-1, rd.site_index("head", "activation_grad"), col["max_abs"]]
    x_last, y_last = x[-16:], y[-16:]
    with tf.GradientTape() as tape:
        pred = model(x_last, training=True)
        loss = tf.reduce_mean(tf.square(tf.cast(pred, tf.float32) - y_last))
    output_truth, kernel_truth = tape.gradient(loss, [pred, model.get_layer("head").kernel])
    # The truth is taken one update later than the row's step: the same order of magnitude.
    assert 0.1 < output_grad / float(np.abs(output_truth).max()) < 10
    assert 0.1 < weight_grad / float(np.abs(kernel_truth).max()) < 10


def test_mirrored_strategy_and_legacy_keras_env(tmp_path):
    """tf_keras under MirroredStrategy (fit and a custom loop), and `tf.keras` made tf_keras by
    TF_USE_LEGACY_KERAS=1, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed", "mirrored_tf_keras.py"), str(tmp_path)],
        env=dict(ENV, TF_USE_LEGACY_KERAS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    truth = json.loads(proc.stdout.split("RESULT ")[1])
    assert truth["tf_keras_is_tf_keras"]
    runs = report_json(tmp_path)
    fit_first = runs["fit"]["first_nonfinite"]
    assert (fit_first["step"], fit_first["kind"], fit_first["nan"]) == (5, "input", 1)
    assert (fit_first["replica"], fit_first["replicas"]) == (1, [1])
    loop = runs["loop"]["first_nonfinite"]
    assert (loop["step"], loop["kind"], loop["posinf"], loop["replica"]) == (2, "input", 1, 0)
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "fit")
    i = rd.site_index(rd.sites[0]["layer"], "input")
    assert rd.rows[0, i, stats.STAT_INDEX["size"]] == 16 * 8  # both replicas' shards
    assert rd.rows[:, i, stats.STAT_INDEX["nan"]].sum() == 1
    assert "hidden/optimizer_state/velocity/kernel" in [summary.site_label(s) for s in rd.sites]
    assert truth["bitwise_plain"], "MirroredStrategy fit differs from plain fit"
