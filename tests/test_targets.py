"""Targets and sample weights are sites: a NaN in the labels of one batch is named as the
target (or sample-weight) site at its step, not as the loss, and watching them changes
nothing training computes."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

import tb_nanwatch
from tb_nanwatch import diagnosis, reader, stats

BATCH = 16


@pytest.fixture(autouse=True, scope="module")
def op_determinism():
    was = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was:
        tf_config.disable_op_determinism()


def read(logdir, run):
    provider, ctx, eid = reader.open_logdir(str(logdir))
    return reader.read_run(provider, ctx, eid, run)


def regression(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    return model


def first_bad_batch(values, batch=BATCH):
    """Ground truth without the writer: the index of the first batch holding a non-finite value."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return int(np.flatnonzero(bad)[0]) // batch


def test_nan_label_in_one_tfdata_batch_is_the_target_site(tmp_path):
    x, y = regression()
    y[5 * BATCH + 3, 0] = np.nan
    truth = first_bad_batch(y)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    model = mlp()
    model.fit(dataset, epochs=1, verbose=0, callbacks=[callback])
    first = reader.first_nonfinite_json(read(tmp_path, "run"))
    assert (first["step"], first["kind"], first["layer"], first["tensor"]) == (
        truth,
        "target",
        model.name,
        "",
    )
    assert first["nan"] == 1
    # The loss only carried it on: it is a propagator, not the producer.
    assert any(p["kind"] == "loss" for p in first["propagators"])
    causes = diagnosis.diagnose(read(tmp_path, "run"))
    assert causes[0]["cause"] == "nonfinite_target", causes
    assert "labels" in causes[0]["evidence"]
    assert "unstable_loss" not in [c["cause"] for c in causes]


def test_nan_sample_weight_is_the_sample_weight_site(tmp_path):
    x, y = regression()
    weights = np.ones(len(x), "float32")
    weights[3 * BATCH + 1] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(BATCH)
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    mlp().fit(dataset, epochs=1, verbose=0, callbacks=[callback])
    first = reader.first_nonfinite_json(read(tmp_path, "run"))
    assert (first["step"], first["kind"]) == (first_bad_batch(weights), "sample_weight")
    causes = diagnosis.diagnose(read(tmp_path, "run"))
    assert causes[0]["cause"] == "nonfinite_target"
    assert "sample weights" in causes[0]["evidence"]


def multi_output():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inp)
    outputs = [
        keras.layers.Dense(1, name="price")(hidden),
        keras.layers.Dense(2, name="position")(hidden),
    ]
    model = keras.Model(inp, outputs, name="two_heads")
    model.compile("adam", ["mse", "mse"])
    return model


def test_multi_output_targets_one_site_per_output_named_by_the_model(tmp_path):
    x, y = regression()
    y2 = np.concatenate([y, -y], axis=1)
    y2[7 * BATCH, 1] = np.inf
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    multi_output().fit(
        x, [y, y2], batch_size=BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[callback]
    )
    targets = [(s["tensor"], s["shape"][1:]) for s in callback.watch.sites if s["kind"] == "target"]
    assert targets == [("price", [1]), ("position", [2])]
    first = reader.first_nonfinite_json(read(tmp_path, "run"))
    assert (first["step"], first["kind"], first["tensor"]) == (7, "target", "position")
    assert first["posinf"] == 1


def test_dict_targets_are_named_by_key():
    from tb_nanwatch.watch import sites

    y = {"b": tf.zeros([2]), "a": {"inner": tf.ones([2]), "labels": tf.zeros([2], tf.int32)}}
    names = [n for n, _ in sites.named_float_tensors(y)]
    assert names == ["a/inner", "b"]  # integer labels cannot be non-finite: no site
    assert [n for n, _ in sites.named_float_tensors([tf.zeros([1]), tf.zeros([1])])] == [
        "output_0",
        "output_1",
    ]
    assert [n for n, _ in sites.named_float_tensors(tf.zeros([1]))] == [""]


def snapshot(model):
    out = [np.array(v.numpy()) for v in model.variables]
    return out + [np.array(v.numpy()) for v in model.optimizer.variables]


def test_healthy_run_with_targets_and_weights_watched_is_bitwise_plain_fit(tmp_path):
    x, y = regression()
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(x)).astype("float32")

    def fit(callbacks):
        model = mlp()
        dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(BATCH)
        model.fit(dataset, epochs=2, verbose=0, callbacks=callbacks)
        return snapshot(model)

    plain = fit([])
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    watched = fit([callback])
    assert [a.tobytes() for a in plain] == [b.tobytes() for b in watched]
    kinds = [s["kind"] for s in callback.watch.sites]
    assert kinds[:3] == ["input", "target", "sample_weight"]
    rd = read(tmp_path, "run")
    assert reader.first_nonfinite_json(rd) is None
    assert diagnosis.diagnose(rd) == []
    # The target site holds the labels' statistics (max |y| of the row's last batch).
    target = rd.site_index(callback.model.name, "target")
    last = y[-BATCH:]
    assert rd.rows[-1, target, stats.STAT_INDEX["max_abs"]] == pytest.approx(np.abs(last).max())


def test_custom_loop_records_targets(tmp_path):
    x, y = regression(64)
    y[40, 0] = np.nan
    model = mlp()
    optimizer = keras.optimizers.SGD(0.01)
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=2)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            yb = watch.record_targets(yb)
            loss = watch.record_loss(tf.reduce_mean((model(xb, training=True) - yb) ** 2))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for xb, yb in tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH):
        train_step(xb, yb)
        if watch.after_step():
            break
    watch.close()
    assert (watch.first_nonfinite["step"], watch.first_nonfinite["kind"]) == (2, "target")


def test_unscaled_targets_quotes_the_measured_targets(tmp_path):
    x, y = regression(512)
    y = y * 1e5  # prices in dollars
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    model.fit(x, y, batch_size=32, shuffle=False, epochs=1, verbose=0, callbacks=[callback])
    assert callback.watch.first_nonfinite is not None
    found = {c["cause"]: c for c in diagnosis.diagnose(read(tmp_path, "run"))}
    evidence = found["unscaled_targets"]["evidence"]
    largest = float(np.abs(y[:32]).max())  # the first batch's labels, without the writer
    assert "measured: %s, target has largest |y| %.3g at step 0" % (model.name, largest) in evidence
