"""Run in a fresh process: several MirroredStrategy objects one after the other (two logical
CPUs), with and without the callback: plain, watched, plain, watched."""

import json
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import tb_nanwatch  # noqa: E402
from tb_nanwatch.watch import sites as site_catalogue  # noqa: E402

logdir = sys.argv[1]
x = np.random.default_rng(0).normal(size=(96, 8)).astype("float32")
y = x[:, :1] * 2


class Repeat(keras.layers.Layer):
    """Calls one Dense eight times: calls no functional graph shows, so the sites outnumber the
    estimate the device state was made with before tracing (which has room for a few target
    sites too)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(16, activation="tanh", use_bias=False, name="inner")

    def call(self, x):
        for _ in range(8):
            x = self.inner(x)
        return x


def fit(data, callbacks=()):
    """A fresh strategy, model and fit; the model.  The same model every time: two
    strategies in one process number their collectives alike, and TensorFlow fails a plain fit
    of a model whose gradients differ in size from the first strategy's ("Shape mismatch in the
    collective instance 100"), with or without the callback."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh", name="hidden"),
                Repeat(name="repeat"),
                keras.layers.Dense(1, name="head"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
    model.fit(data, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks))
    return model


def weights(model):
    return [v.numpy() for v in model.weights]


out = {}
fit(x)  # a plain fit under a first strategy
watched = tb_nanwatch.NanWatchCallback(logdir + "/second", log_every=2)
second = weights(fit(x, [watched]))  # the callback under a second strategy
out["second_sites"] = len(watched.watch.sites)
third = weights(
    fit(x)
)  # plain again, under a third: the watch left the strategies' numbering alone
out["weights_equal"] = all(a.tobytes() == b.tobytes() for a, b in zip(second, third))
bad = x.copy()
bad[3 * 16 + 9, 2] = np.nan  # step 3, element 9 of 16: the second replica's shard
fourth = tb_nanwatch.NanWatchCallback(logdir + "/fourth", log_every=2)
model = fit(bad, [fourth])
out["fourth_planned"] = site_catalogue.capacity(
    site_catalogue.layer_paths(model), model.trainable_variables, [model.optimizer]
)
out["fourth_sites"] = len(fourth.watch.sites)
out["fourth_first"] = fourth.watch.first_nonfinite
out["fourth_activations"] = [s["layer"] for s in fourth.watch.sites if s["kind"] == "activation"]
print("RESULT " + json.dumps(out))
