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

logdir = sys.argv[1]
x = np.random.default_rng(0).normal(size=(96, 8)).astype("float32")
y = x[:, :1] * 2


def fit(data, callbacks=()):
    """A fresh strategy, model and fit; the weights after it."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="tanh", name="hidden"),
                keras.layers.Dense(1, name="head"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
    model.fit(data, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=list(callbacks))
    return [v.numpy() for v in model.weights]


out = {}
fit(x)  # a plain fit under a first strategy
watched = tb_nanwatch.NanWatchCallback(logdir + "/second", log_every=2)
second = fit(x, [watched])  # the callback under a second strategy
out["second_sites"] = len(watched.watch.sites)
third = fit(x)  # plain again, under a third: the watch left the strategies' numbering alone
out["weights_equal"] = all(a.tobytes() == b.tobytes() for a, b in zip(second, third))
bad = x.copy()
bad[3 * 16 + 9, 2] = np.nan  # step 3, element 9 of 16: the second replica's shard
fourth = tb_nanwatch.NanWatchCallback(logdir + "/fourth", log_every=2)
fit(bad, [fourth])
out["fourth_first"] = fourth.watch.first_nonfinite
print("RESULT " + json.dumps(out))
