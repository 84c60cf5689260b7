"""The state before the first update: the `initial` record holds every weight and optimizer
slot as training starts (rows log weights after each step's update), and the
large_initial_weights rule reads it, so a first update that blows the weights up is not
taken for the initialisation."""

import logging

import keras
import numpy as np
import pytest

import tb_nanwatch
from tb_nanwatch import diagnosis, metadata, reader, stats

COL = stats.STAT_INDEX


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("tb_nanwatch").setLevel(logging.ERROR)
    yield
    logging.getLogger("tb_nanwatch").setLevel(logging.NOTSET)


def read(logdir, run="run"):
    provider, ctx, eid = reader.open_logdir(str(logdir))
    return reader.read_run(provider, ctx, eid, run)


def test_initial_record_is_the_state_before_the_first_update(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = rng.normal(size=(128, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(0.1), "mse")
    kernel = model.layers[0].kernel.numpy().copy()
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=4)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    rd = read(tmp_path)
    assert rd.initial is not None and rd.initial.shape == (len(rd.sites), len(stats.STATS))
    i = rd.site_index(model.layers[0].name, "weight", "kernel")
    initial = rd.initial[i]
    assert initial[COL["norm"]] == pytest.approx(np.linalg.norm(kernel), rel=1e-6)
    assert initial[COL["max_abs"]] == pytest.approx(np.abs(kernel).max(), rel=1e-6)
    assert initial[COL["mean"]] == pytest.approx(kernel.mean(), rel=1e-4, abs=1e-7)
    assert initial[COL["size"]] == kernel.size and np.isnan(initial[COL["steps"]])
    # The row of step 0 holds the weights after step 0's update: not the same.
    assert rd.rows[0, i, COL["norm"]] != pytest.approx(initial[COL["norm"]], rel=1e-3)
    # Adam's slots start at zero; only weights and slots are measured.
    for s, site in enumerate(rd.sites):
        if site["kind"] == "optimizer_state":
            assert rd.initial[s, COL["norm"]] == 0 and rd.initial[s, COL["size"]] > 0
        elif site["kind"] != "weight":
            assert np.isnan(rd.initial[s]).all(), site
    assert metadata.tag(metadata.INITIAL) == "nanwatch/initial"


def rnn_regression(tmp_path, name, learning_rate, stddev=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 10, 4)).astype("float32")
    y = (x.sum(axis=(1, 2))[:, None] * 10).astype("float32")
    keras.utils.set_random_seed(0)
    options = {}
    if stddev:
        init = keras.initializers.RandomNormal(stddev=stddev)
        options = dict(activation="relu", kernel_initializer=init, recurrent_initializer=init)
        y = y / 10
    model = keras.Sequential(
        [keras.Input((10, 4)), keras.layers.SimpleRNN(16, **options), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(learning_rate), "mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / name), log_every=4)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    assert callback.watch.first_nonfinite is not None
    return read(tmp_path, name)


def test_a_first_update_that_blows_the_weights_up_is_not_a_large_initialisation(tmp_path):
    # SGD(1.0) on an RNN: the first update takes the cell's kernel to 10x the He scale.  Its
    # output is not watched (the cell runs inside the layer's loop), so without the initial
    # record nothing told the update from the initialisation.
    rd = rnn_regression(tmp_path, "run", learning_rate=1.0)
    assert "large_initial_weights" not in [c["cause"] for c in diagnosis.diagnose(rd)]
    # Logs without the record (written before it existed) are read as before: there the
    # post-update weights are all the rule has, and it names the initialisation.
    rd.initial = None
    assert "large_initial_weights" in [c["cause"] for c in diagnosis.diagnose(rd)]


def test_large_initial_weights_read_from_the_initial_record(tmp_path):
    rd = rnn_regression(tmp_path, "run", learning_rate=0.001, stddev=10.0)
    found = {c["cause"]: c for c in diagnosis.diagnose(rd)}
    assert "large_initial_weights" in found, list(found)
    assert (
        "as training started, before the first update" in found["large_initial_weights"]["evidence"]
    )


def test_custom_loop_with_an_unbuilt_optimizer_records_the_weights(tmp_path):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kernel = model.layers[0].kernel.numpy().copy()
    optimizer = keras.optimizers.Adam(0.5)
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=1)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = watch.record_loss(tf.reduce_mean((model(x, training=True) - y) ** 2))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for _ in range(3):
        step(tf.ones([4, 3]), tf.zeros([4, 2]))
        watch.after_step()
    watch.close()
    rd = read(tmp_path)
    i = rd.site_index(model.layers[0].name, "weight", "kernel")
    assert rd.initial[i, COL["norm"]] == pytest.approx(np.linalg.norm(kernel), rel=1e-6)
    # The slots did not exist before the first step: not measured, not made up.
    slots = [s for s, site in enumerate(rd.sites) if site["kind"] == "optimizer_state"]
    assert slots and np.isnan(rd.initial[slots, COL["norm"]]).all()
