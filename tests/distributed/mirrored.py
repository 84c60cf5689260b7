"""Run in a fresh process: two logical CPUs, MirroredStrategy, fit and a custom loop."""

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
out = {}

# fit(): global batch 16 = two shards of 8; one NaN in the second shard of step 5.
x = np.random.default_rng(0).normal(size=(160, 8)).astype("float32")
x[5 * 16 + 12, 3] = np.nan
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
cb = tb_nanwatch.NanWatchCallback(logdir + "/fit", log_every=4)
model.fit(x, x[:, :1], batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
out["fit_input_max_abs_step0"] = float(np.abs(x[:16]).max())

# A custom loop through strategy.run: an Inf in replica 0's shard at step 2.
with strategy.scope():
    keras.utils.set_random_seed(0)
    model2 = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    optimizer = keras.optimizers.SGD(0.01)
watch = tb_nanwatch.Watch(logdir + "/loop", model2, optimizer, log_every=2)


@tf.function
def train_step(batch):
    def replica_fn(xb):
        with tf.GradientTape() as tape:
            loss = watch.record_loss(tf.reduce_mean(tf.square(model2(xb, training=True))))
        grads = tape.gradient(loss, model2.trainable_variables)
        optimizer.apply_gradients(zip(grads, model2.trainable_variables))

    strategy.run(replica_fn, args=(batch,))


y = np.random.default_rng(1).normal(size=(6 * 16, 8)).astype("float32")
y[2 * 16 + 1, 0] = np.inf  # element 1 of global batch 2: replica 0's shard
for batch in strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(y).batch(16)
):
    train_step(batch)
    watch.after_step()
watch.close()
print("RESULT " + json.dumps(out))
