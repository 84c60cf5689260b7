"""Stop mode: the first non-finite step changes no variable, its batch and state are bundled.

For every kind of producer, the model trained with `on_nonfinite="stop"` ends with weights and
optimizer variables bitwise equal to a plain fit of exactly the steps before the failing one,
and names the same first site as record mode."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import stop_scenarios as sc
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch import bundle

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class BatchCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ended = 0

    def on_train_batch_end(self, batch, logs=None):
        self.ended += 1


def fit_watched(scenario, logdir, on_nonfinite, jit_compile=False, **options):
    build, x, y, loss, make_optimizer, _ = scenario()
    model = build()
    model.compile(optimizer=make_optimizer(), loss=loss, jit_compile=jit_compile)
    cb = tb_nanwatch.NanWatchCallback(
        str(logdir), log_every=4, on_nonfinite=on_nonfinite, **options
    )
    counter = BatchCounter()
    model.fit(
        x, y, batch_size=sc.BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[cb, counter]
    )
    return model, cb, counter


def plain_state(scenario, steps, jit_compile=False):
    """Weights and optimizer variables of a plain fit of the first `steps` batches."""
    build, x, y, loss, make_optimizer, _ = scenario()
    model = build()
    model.compile(optimizer=make_optimizer(), loss=loss, jit_compile=jit_compile)
    if steps:
        model.fit(
            x[: steps * sc.BATCH],
            y[: steps * sc.BATCH],
            batch_size=sc.BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
    else:
        model.optimizer.build(model.trainable_variables)
    return model


def assert_same_state(model, plain):
    assert [v.name for v in model.variables] == [v.name for v in plain.variables]
    for a, b in zip(model.variables, plain.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path, strict=True)
    opt, plain_opt = model.optimizer.variables, plain.optimizer.variables
    assert len(opt) == len(plain_opt)
    for a, b in zip(opt, plain_opt):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path, strict=True)
    assert all(np.isfinite(v.numpy()).all() for v in model.weights)


def first_site(record):
    return (record["step"], record["layer"], record["kind"], record.get("tensor", ""))


@pytest.mark.parametrize("producer", sorted(sc.PRODUCERS))
def test_stop_leaves_the_state_before_the_failing_step(producer, tmp_path):
    scenario = sc.PRODUCERS[producer]
    model, cb, counter = fit_watched(scenario, tmp_path / "stop", "stop")
    record = cb.watch.first_nonfinite
    assert record is not None
    step = record["step"]
    expected_step = scenario()[-1]
    if expected_step is not None:
        assert step == expected_step
    assert counter.ended == step + 1  # training stopped after the failing step
    assert model.stop_training and cb.watch.should_stop

    # The same first site as record mode, which lets the step through.
    _, recorded, _ = fit_watched(scenario, tmp_path / "record", "record")
    assert first_site(recorded.watch.first_nonfinite) == first_site(record)
    if producer == "optimizer_state":
        assert (record["kind"], record["tensor"]) == ("optimizer_state", "velocity/kernel")

    assert_same_state(model, plain_state(scenario, step))

    # The bundle: the state before the step (the model's, now) and the step's batch.
    loaded = tb_nanwatch.load_bundle(tmp_path / "stop")
    assert loaded.step == step and loaded.state == "before_step"
    _, x, y, _, _, _ = scenario()
    rows = slice(step * sc.BATCH, (step + 1) * sc.BATCH)
    assert list(loaded.batch) == ["x", "y"]
    np.testing.assert_array_equal(loaded.batch["x"], x[rows], strict=True)
    np.testing.assert_array_equal(loaded.batch["y"], y[rows], strict=True)
    assert list(loaded.weights) == [v.path for v in model.variables]
    for v in model.variables:
        np.testing.assert_array_equal(loaded.weights[v.path], v.numpy())
    assert list(loaded.optimizer_variables) == [v.path for v in model.optimizer.variables]
    for v in model.optimizer.variables:
        np.testing.assert_array_equal(loaded.optimizer_variables[v.path], v.numpy())
    assert loaded.policy == "float32"
    assert json.loads(loaded.architecture)["class_name"] == "Sequential"
    assert bundle.describe(tmp_path / "stop") == {
        "path": os.path.join(str(tmp_path / "stop"), "nanwatch_bundle"),
        "step": step,
        "state": "before_step",
    }
    assert bundle.describe(tmp_path / "record") is None  # record mode writes no bundle


@pytest.mark.parametrize("producer", ["input", "optimizer_state"])
def test_stop_under_xla(producer, tmp_path):
    scenario = sc.PRODUCERS[producer]
    model, cb, counter = fit_watched(scenario, tmp_path / "stop", "stop", jit_compile=True)
    step = cb.watch.first_nonfinite["step"]
    assert counter.ended == step + 1
    assert_same_state(model, plain_state(scenario, step, jit_compile=True))
    loaded = tb_nanwatch.load_bundle(tmp_path / "stop")
    _, x, _, _, _, _ = scenario()
    np.testing.assert_array_equal(
        loaded.batch["x"], x[step * sc.BATCH : (step + 1) * sc.BATCH], strict=True
    )


def test_later_steps_are_rolled_back_until_the_host_stops(tmp_path):
    """check_every=4: the host learns of step 3 at step 3 anyway, but steps_per_execution=4
    runs steps 4..7 in the same call; they change nothing either."""
    scenario = sc.nan_input_row
    build, x, y, loss, make_optimizer, _ = scenario()
    model = build()
    model.compile(optimizer=make_optimizer(), loss=loss, steps_per_execution=4)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path), on_nonfinite="stop")
    model.fit(x, y, batch_size=sc.BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert cb.watch.first_nonfinite["step"] == 3
    assert_same_state(model, plain_state(scenario, 3))
    np.testing.assert_array_equal(
        tb_nanwatch.load_bundle(tmp_path).batch["x"], x[3 * sc.BATCH : 4 * sc.BATCH]
    )


def test_record_mode_is_unchanged_and_trains_on(tmp_path):
    model, cb, counter = fit_watched(sc.nan_input_row, tmp_path, "record")
    assert cb.watch.first_nonfinite["step"] == 3 and not cb.watch.should_stop
    assert counter.ended == 24  # both epochs
    assert not np.isfinite(model.weights[0].numpy()).all()


@pytest.mark.parametrize("compiled", [True, False], ids=["tf_function", "eager"])
def test_custom_loop_stop(compiled, tmp_path):
    build, x, y, _, _, _ = sc.log_of_zero()

    def run(on_nonfinite, logdir, steps=None):
        model = build()
        optimizer = keras.optimizers.Adam(1e-3)
        watch = (
            tb_nanwatch.Watch(str(logdir), model, optimizer, on_nonfinite=on_nonfinite)
            if on_nonfinite
            else None
        )

        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
                if watch is not None:
                    loss = watch.record_loss(loss)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        if compiled:
            train_step = tf.function(train_step)
        if watch is None:
            optimizer.build(model.trainable_variables)
        for i in range(len(x) // sc.BATCH if steps is None else steps):
            train_step(x[i * sc.BATCH : (i + 1) * sc.BATCH], y[i * sc.BATCH : (i + 1) * sc.BATCH])
            if watch is not None and watch.after_step():
                break
        if watch is not None:
            watch.close()
        return model, optimizer, watch

    model, optimizer, watch = run("stop", tmp_path)
    assert watch.should_stop and watch.first_nonfinite["step"] == 4
    assert watch.first_nonfinite["layer"] == "log_features"
    plain, plain_optimizer, _ = run(None, None, steps=4)
    for a, b in zip(
        model.variables + optimizer.variables, plain.variables + plain_optimizer.variables
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path, strict=True)
    loaded = tb_nanwatch.load_bundle(tmp_path)
    assert list(loaded.batch) == ["x"]  # a custom loop's batch is the model's input
    np.testing.assert_array_equal(loaded.batch["x"], x[4 * sc.BATCH : 5 * sc.BATCH])


def test_stop_on_nonfinite_is_a_deprecated_alias(tmp_path):
    with pytest.warns(DeprecationWarning, match="on_nonfinite"):
        cb = tb_nanwatch.NanWatchCallback(str(tmp_path), stop_on_nonfinite=True)
    assert cb.on_nonfinite == "stop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tb_nanwatch.NanWatchCallback(str(tmp_path)).on_nonfinite == "record"
    with pytest.raises(ValueError, match="disagree"):
        tb_nanwatch.NanWatchCallback(str(tmp_path), stop_on_nonfinite=True, on_nonfinite="record")
    with pytest.raises(ValueError, match="on_nonfinite must be one of record, stop"):
        tb_nanwatch.NanWatchCallback(str(tmp_path), on_nonfinite="halt")
    model = sc.nan_input_row()[0]()
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="'pause'"):
        tb_nanwatch.Watch(str(tmp_path), model, on_nonfinite="pause")


def test_stop_mode_under_mirrored_strategy(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed", "mirrored_stop.py"), str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[1])
    assert result["first"] == [3, "input"]
    assert result["ended"] == 4
    assert result["differences"] == []
    assert bundle.describe(tmp_path)["step"] == 3
    assert result["batch_x"] and result["batch_y"]


def test_loss_scale_skips_do_not_stop_and_a_finite_run_is_plain_fit(tmp_path):
    """mixed_float16: the LossScaleOptimizer skips steps whose scaled gradients overflow, by
    design; stop mode lets them be, and the run ends bitwise where plain fit ends."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
        y = (x.sum(axis=1, keepdims=True) * 300).astype("float32")

        def build():
            keras.utils.set_random_seed(0)
            model = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(16, activation="relu", name="hidden"),
                    keras.layers.Dense(1, dtype="float32", name="head"),
                ],
                name="model",
            )
            model.compile(optimizer="adam", loss="mse")
            return model

        model = build()
        cb = tb_nanwatch.NanWatchCallback(str(tmp_path), log_every=4, on_nonfinite="stop")
        counter = BatchCounter()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[cb, counter])
        plain = build()
        plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert counter.ended == 32 and cb.watch.first_nonfinite is None
    assert int(model.optimizer.iterations.numpy()) < 32  # some steps were skipped
    assert bundle.describe(tmp_path) is None
    assert_same_state(model, plain)


def _matrix_cases():
    from test_models import CASES

    return {name: case for name, case in CASES.items() if case.target is not None}


@pytest.mark.parametrize("name", sorted(_matrix_cases()))
def test_stop_mode_on_the_model_matrix(name, tmp_path):
    """The writer's model matrix (RNNs, nested and subclassed models, a GAN with two optimizers,
    steps_per_execution, ...): a NaN written into a weight at the start of step 3 is the step's
    fault; stop mode leaves every model and optimizer variable as it was at that step's start."""
    import model_matrix as mm

    case = _matrix_cases()[name]
    tf.config.experimental.enable_op_determinism()
    probe = mm.Probe(case, ground_truth=False)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path), log_every=2, on_nonfinite="stop")
    model = mm._fit(case, [cb, probe])
    assert cb.watch.first_nonfinite["step"] == case.inject_step
    assert model.stop_training
    # What the step started from: the snapshot, with the injected NaN.
    target = "model/" + case.target_variable(model).path
    expected = [(n, a.copy()) if n != target else (n, _with_nan(a)) for n, a in probe.snapshot]
    assert target in dict(expected)
    state = mm.variable_values(model, case.optimizers(model))
    assert mm.compare_bitwise(expected, state) == []
    assert tb_nanwatch.load_bundle(tmp_path).step == case.inject_step


def _with_nan(array):
    array = array.copy()
    array.reshape(-1)[0] = np.nan
    return array
