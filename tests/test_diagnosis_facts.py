"""Causes read from facts, on real trainings: the op inventory of a float16 layer, a weight that
an update of 0 / 0 made NaN, a recurrent state that explodes through time.  Each run is small
and trains in a second or two; the diagnosis is read back from the run directory as the CLI
and the tab read it."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch import diagnosis, runview


def diagnose(run_dir):
    view = runview.from_files(os.path.basename(run_dir), run_dir)
    return view, diagnosis.diagnose(view)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


class NaiveAttention(keras.layers.Layer):
    """Self-attention with a hand-written softmax: exp(scores) / sum(exp(scores))."""

    def call(self, x):
        scores = tf.matmul(x, x, transpose_b=True)
        weights = tf.exp(scores)
        return tf.matmul(weights / tf.reduce_sum(weights, -1, keepdims=True), x)


def test_a_float16_softmax_that_overflows_is_named_from_the_op_inventory(tmp_path, mixed_float16):
    """exp overflows float16 (65504) and Inf / Inf makes the NaN the logs show: no +Inf is ever
    logged, so only the layer's op types (Exp in nanwatch_ops.json) tell it from a domain error."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 6, 16)).astype("float32") * 3
    y = np.zeros((64, 1), "float32")
    model = keras.Sequential(
        [
            keras.Input((6, 16)),
            NaiveAttention(name="naive_attention"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )
    model.compile("adam", "mse")
    run_dir = str(tmp_path / "run")
    model.fit(
        x, y, epochs=1, batch_size=32, verbose=0, callbacks=[tb_nanwatch.NanWatchCallback(run_dir)]
    )
    view, found = diagnose(run_dir)
    producer = view.sites[view.producer]
    assert (producer["layer"], producer["kind"], producer["dtype"]) == (
        "naive_attention",
        "activation",
        "float16",
    )
    assert view.first["nan"] and not view.first["posinf"]
    assert found[0]["cause"] == "reduced_precision_overflow"
    assert "computes Exp" in found[0]["evidence"]
    assert "domain_error" not in [f["cause"] for f in found]
    # Without the op inventory the same logs read as a domain error: the fact decides.
    os.remove(os.path.join(run_dir, "nanwatch_ops.json"))
    assert diagnose(run_dir)[1][0]["cause"] == "domain_error"


def test_adam_with_epsilon_zero_divides_zero_by_zero_on_unused_embedding_rows(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50, size=(128, 5))  # rows 50..99 of the table never get a gradient
    y = rng.normal(size=(128, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(100, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3, epsilon=0.0), "mse")
    run_dir = str(tmp_path / "run")
    model.fit(
        tokens,
        y,
        epochs=1,
        batch_size=32,
        shuffle=False,
        verbose=0,
        callbacks=[tb_nanwatch.NanWatchCallback(run_dir)],
    )
    view, found = diagnose(run_dir)
    assert view.sites[view.producer]["kind"] == "weight"
    assert found[0]["cause"] == "optimizer_zero_division"
    unused_rows = 100 - len(np.unique(tokens[:32]))  # by the first batch, the failing step
    assert "%d of its 800 elements" % (8 * unused_rows) in found[0]["evidence"]


def test_a_relu_rnn_whose_state_explodes_through_time(tmp_path):
    """Identity-initialised ReLU SimpleRNN (an IRNN) with a gain of 1.3 at the start: sane by
    its role's scale, and 1.3^60 later the state overflows."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    x = np.abs(rng.normal(size=(64, 300, 2))).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((300, 2)),
            keras.layers.SimpleRNN(
                8,
                activation="relu",
                recurrent_initializer=keras.initializers.Identity(gain=1.3),
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    run_dir = str(tmp_path / "run")
    model.fit(
        x, y, epochs=1, batch_size=32, verbose=0, callbacks=[tb_nanwatch.NanWatchCallback(run_dir)]
    )
    view, found = diagnose(run_dir)
    assert view.first is not None
    assert found[0]["cause"] == "recurrent_explosion", found
    assert "over 300 time steps" in found[0]["evidence"]
    assert "gain (RMS x sqrt(units)) was 1.3 as training started" in found[0]["evidence"]
