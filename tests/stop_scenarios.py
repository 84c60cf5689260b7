"""Blow-ups at a known step, one per kind of producer, for stop mode's tests.

Each scenario returns (build, x, y, loss, optimizer factory, batch size); the data's order is
fixed (fit with shuffle=False) so a plain fit of the first S batches reaches the same state."""

import keras
import numpy as np
import tensorflow as tf

BATCH = 8


@keras.saving.register_keras_serializable(package="tb_nanwatch_tests")
class LogFeatures(keras.layers.Layer):
    """log|x|: -inf where a feature is exactly 0."""

    def call(self, x):
        return tf.math.log(tf.abs(x))


@keras.saving.register_keras_serializable(package="tb_nanwatch_tests")
class SqrtAbs(keras.layers.Layer):
    """sqrt|x|: finite at 0, but its gradient there is inf * sign(0) = NaN."""

    def call(self, x):
        return tf.sqrt(tf.abs(x))


def _normal(rows, cols, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype("float32")


def nan_input_row():
    """One NaN in one input row of step 3."""
    x = _normal(12 * BATCH, 6)
    x[3 * BATCH + 5, 2] = np.nan
    y = (x[:, :1] > 0).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="relu", name="hidden"),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.Adam(1e-3), 3


def log_of_zero():
    """log of an exact 0 in a custom layer at step 4 (-inf activation)."""
    x = _normal(12 * BATCH, 4) + 3.0
    x[4 * BATCH + 2, 1] = 0.0
    y = _normal(12 * BATCH, 1, seed=1)

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                LogFeatures(name="log_features"),
                keras.layers.Dense(4, activation="tanh", name="hidden"),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.SGD(0.01), 4


def sqrt_gradient_at_zero():
    """An all-zero input row at step 2: hidden (no bias) outputs 0 there, sqrt's gradient is NaN."""
    x = _normal(12 * BATCH, 4)
    x[2 * BATCH + 1] = 0.0
    y = _normal(12 * BATCH, 1, seed=1)

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, use_bias=False, name="hidden"),
                SqrtAbs(name="sqrt_abs"),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.RMSprop(1e-3), 2


def adam_slot_overflow():
    """The articles' scenario F: data uniform in +-1e10, Dense(1), adam, mse; Adam's velocity
    goes +Inf (g^2 > 3.4e38) while the gradient is finite."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1e10, 1e10, (12 * BATCH, 1)).astype("float32")
    y = rng.uniform(-1e10, 1e10, (12 * BATCH, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((1,)), keras.layers.Dense(1, name="dense")], name="model"
        )

    return build, x, y, "mse", lambda: keras.optimizers.Adam(), None


def float16_overflow():
    """A float16 Dense whose inputs are scaled x1000 at step 3 only: its output passes 65,504."""
    x = np.abs(_normal(12 * BATCH, 20))
    x[3 * BATCH : 4 * BATCH] *= 1000.0
    y = (x[:, :1] > 0.5).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((20,)),
                keras.layers.Dense(
                    16,
                    activation="relu",
                    name="big_init",
                    dtype="float16",
                    kernel_initializer=keras.initializers.RandomUniform(2, 4),
                ),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.Adam(1e-3), 3


@keras.saving.register_keras_serializable(package="tb_nanwatch_tests")
class ExpNormalise(keras.layers.Layer):
    """A softmax written by hand: exp(x) / sum(exp(x)).  In float16 exp passes 65,504 for
    x > 11.1, and inf / inf makes the output NaN (not Inf): the logs alone read a domain error."""

    def call(self, x):
        e = tf.math.exp(x)
        return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def float16_exp_overflow():
    """exp overflows in a float16 layer at step 2 (one input row x20): its output is NaN."""
    x = _normal(12 * BATCH, 4)
    x[2 * BATCH + 3] *= 20.0
    x[2 * BATCH + 3, 0] = 14.0
    y = _normal(12 * BATCH, 1, seed=1)

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                ExpNormalise(name="exp_normalise", dtype="float16"),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.SGD(0.01), 2


PRODUCERS = {
    "input": nan_input_row,
    "activation": log_of_zero,
    "gradient": sqrt_gradient_at_zero,
    "optimizer_state": adam_slot_overflow,
    "float16": float16_overflow,
}


# Lives outside the model on purpose: stop mode does not roll it back, so a replay does not
# see the first call again -- a fault that does not recur.
_TRANSIENT_CALLS = tf.Variable(0, dtype=tf.int64, trainable=False, name="transient_calls")


@keras.saving.register_keras_serializable(package="tb_nanwatch_tests")
class TransientNaN(keras.layers.Layer):
    """Identity, except that its first-ever call in this process outputs NaN (a transient fault)."""

    def call(self, x):
        calls = _TRANSIENT_CALLS.assign_add(1)
        return tf.where(tf.equal(calls, 1), tf.fill(tf.shape(x), np.float32(np.nan)), x)


def transient_fault():
    _TRANSIENT_CALLS.assign(0)
    x = _normal(12 * BATCH, 4)
    y = _normal(12 * BATCH, 1, seed=1)

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(4, name="hidden"),
                TransientNaN(name="flaky"),
                keras.layers.Dense(1, name="head"),
            ],
            name="model",
        )

    return build, x, y, "mse", lambda: keras.optimizers.SGD(0.01), 0
