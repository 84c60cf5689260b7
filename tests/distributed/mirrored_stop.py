"""Run in a fresh process: stop mode under MirroredStrategy on two logical CPUs.  A NaN in the
second replica's shard of step 3; the state after fit must equal a plain fit of steps 0-2."""

import json
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import tb_nanwatch  # noqa: E402

logdir = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).normal(size=(160, 8)).astype("float32")
x[3 * 16 + 12, 3] = np.nan


def build():
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
    return model


class Counter(keras.callbacks.Callback):
    ended = 0

    def on_train_batch_end(self, batch, logs=None):
        Counter.ended += 1


model = build()
cb = tb_nanwatch.NanWatchCallback(logdir, on_nonfinite="stop")
model.fit(x, x[:, :1], batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb, Counter()])
plain = build()
plain.fit(x[:48], x[:48, :1], batch_size=16, epochs=1, verbose=0, shuffle=False)
differences = [
    a.path
    for a, b in zip(
        model.variables + model.optimizer.variables, plain.variables + plain.optimizer.variables
    )
    if not np.array_equal(a.numpy(), b.numpy())
]
record = cb.watch.first_nonfinite
batch = tb_nanwatch.load_bundle(logdir).batch
out = {
    "first": [record["step"], record["kind"]],
    "ended": Counter.ended,
    "differences": differences,
    # The global batch of step 3, joined from the two replicas' shards.
    "batch_x": bool(np.array_equal(batch["x"], x[48:64], equal_nan=True)),
    "batch_y": bool(np.array_equal(batch["y"], x[48:64, :1], equal_nan=True)),
}
print("RESULT " + json.dumps(out))
