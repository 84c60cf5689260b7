"""Small training scenarios whose first non-finite value is produced at a known kind of site,
and independent ground truths for them (check_numerics, host-side observers)."""

import re

import keras
import numpy as np
import tensorflow as tf

BATCH = 8


class BatchCounter(keras.callbacks.Callback):
    """Ground truth for the step: counts the batches Keras started, across epochs."""

    def __init__(self):
        super().__init__()
        self.started = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.started += 1


class HostObserver(keras.callbacks.Callback):
    """Ground truth from outside the writer: after every batch, looks at the optimizer's
    slots and the weights on the host and notes the first step any held a NaN/Inf."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.first = None  # (step, variable name)

    def on_train_batch_end(self, batch, logs=None):
        if self.first is None:
            for v in self.model.optimizer.variables + self.model.trainable_variables:
                value = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    self.first = (self.step, v.path)
                    break
        self.step += 1


def check_numerics_ground_truth(build, x, y, loss, layer_names, epochs=1):
    """(step, layer name, op) of the first non-finite op, by TensorFlow's own check_numerics."""
    model = build()
    model.compile(optimizer="adam", loss=loss)
    counter = BatchCounter()
    tf.debugging.enable_check_numerics()
    try:
        model.fit(
            x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[counter]
        )
    except tf.errors.InvalidArgumentError as e:
        node = re.search(r"Detected at node (\S+)", str(e)).group(1)
        op = re.search(r'graph op "(\w+)"', str(e)).group(1)
        # Keras name scopes add "_1"-style suffixes: match a component to a layer name.
        components = node.split("/")
        names = [
            n
            for n in layer_names
            if any(c == n or re.fullmatch(re.escape(n) + r"_\d+", c) for c in components)
        ]
        return counter.started - 1, (names[-1] if names else None), op, node
    finally:
        tf.debugging.disable_check_numerics()
    return None


def forward_exp():
    """+Inf made by a forward op in a middle layer at step 5: exp of large values."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    x[40:48] *= 1000.0
    y = np.zeros((64, 1), "float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, name="dense_in"),
                keras.layers.Lambda(tf.exp, name="exp_layer"),
                keras.layers.Dense(1, name="out"),
            ]
        )

    return build, x, y, "mse", ["dense_in", "exp_layer", "out"]


def backward_sqrt():
    """The gradient of sqrt at 0 is +Inf while the forward pass stays finite (step 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = np.ones((64, 1), "float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu", name="hidden"),
                keras.layers.Lambda(tf.sqrt, name="sqrt"),
                keras.layers.Dense(1, name="out"),
            ]
        )

    return build, x, y, "mse", ["hidden", "sqrt", "out"]


def handwritten_bce(y_true, y_pred):
    return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))


def loss_log():
    """Article scenario A with a hand-written BCE: sigmoid saturates, log(0) in the loss."""
    rng = np.random.default_rng(0)
    x = (rng.random((64, 20)) * 100).astype("float32")
    y = rng.integers(0, 2, size=(64, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((20,)),
                keras.layers.Dense(16, activation="relu", name="hidden"),
                keras.layers.Dense(1, activation="sigmoid", name="head"),
            ]
        )

    return build, x, y, handwritten_bce, ["hidden", "head"]


def adam_velocity():
    """Article scenario F: data in +-1e10, Dense(1), adam, mse."""
    keras.utils.set_random_seed(0)
    x = tf.random.uniform((BATCH * 12, 1), minval=-1e10, maxval=1e10).numpy()
    y = tf.random.uniform((BATCH * 12, 1), minval=-1e10, maxval=1e10).numpy()

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="dense")])

    return build, x, y, "mse", ["dense"]


def float16_overflow():
    """Article scenario B under the float16 policy with inputs x1000: the first Dense overflows."""
    rng = np.random.default_rng(0)
    x = (rng.random((64, 20)) * 1000).astype("float32")
    y = rng.integers(0, 2, size=(64, 1)).astype("float32")

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
                    kernel_initializer=keras.initializers.RandomUniform(10, 20),
                ),
                keras.layers.Dense(1, activation="sigmoid", name="head", dtype="float16"),
            ]
        )

    return build, x, y, "binary_crossentropy", ["big_init", "head"]


def healthy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="relu", name="hidden"),
                keras.layers.Dense(1, activation="sigmoid", name="head"),
            ]
        )

    return build, x, y, "binary_crossentropy", ["hidden", "head"]
