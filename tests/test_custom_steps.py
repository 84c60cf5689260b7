"""A custom train step the writer must not break: gradient accumulation over micro-batches (one
GradientTape each, one apply per step) on a subclassed model that builds in its first call."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tb_nanwatch


class Accumulating(keras.Model):
    """Its gradient list is made from `trainable_variables` before the model is built, so the
    first trace applies an empty list of gradients to the variables the call then creates."""

    def __init__(self, micro=4):
        super().__init__()
        self.micro = micro
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.hidden(x))

    def train_step(self, data):
        x, y = data
        total = [tf.zeros_like(v) for v in self.trainable_variables]
        for xm, ym in zip(tf.split(x, self.micro), tf.split(y, self.micro)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(xm, training=True) - ym))
            grads = tape.gradient(loss, self.trainable_variables)
            total = [t + g / self.micro for t, g in zip(total, grads)]
        self.optimizer.apply(total, self.trainable_variables)
        return {"loss": loss}


def fit(callbacks):
    x = np.random.default_rng(0).standard_normal((128, 4)).astype("float32")
    model = Accumulating()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(x, x[:, :1], batch_size=32, epochs=1, verbose=0, callbacks=callbacks)


def test_an_apply_with_fewer_gradients_than_variables_fails_as_plain_keras_does(tmp_path):
    """Plain Keras traces this step again once the model is built and refuses the variables
    the second trace creates.  The writer raised its own IndexError first, in a weight-gradient
    getter (fresh3_writer_crashes.py); now an apply without a variable's gradient gives it no
    weight_grad site, and the run fails with Keras' own error, as without the callback."""
    with pytest.raises(ValueError, match="singleton tf.Variables") as plain:
        fit([])
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=1)
    with pytest.raises(ValueError, match="singleton tf.Variables") as watched:
        fit([callback])
    assert type(watched.value) is type(plain.value)
