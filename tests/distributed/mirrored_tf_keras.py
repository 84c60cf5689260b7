"""Run in a fresh process with TF_USE_LEGACY_KERAS=1: two logical CPUs, MirroredStrategy,
tf.keras (tf_keras) fit and a custom loop."""

import json
import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_keras  # noqa: E402

import tb_nanwatch  # noqa: E402

keras2 = tf.keras  # tf_keras, by TF_USE_LEGACY_KERAS=1
logdir = sys.argv[1]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {"tf_keras_is_tf_keras": type(keras2.layers.Dense(1)).__module__.startswith("tf_keras.")}

# fit(): global batch 16 = two shards of 8; one NaN in the second shard of step 5.
x = np.random.default_rng(0).normal(size=(160, 8)).astype("float32")
x[5 * 16 + 12, 3] = np.nan


def fit(callbacks):
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        model = keras2.Sequential(
            [
                keras2.Input((8,)),
                keras2.layers.Dense(16, activation="tanh", name="hidden"),
                keras2.layers.Dense(1, name="head"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
    model.fit(x, x[:, :1], batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return [v.numpy().tobytes() for v in model.variables + list(model.optimizer.variables)]


watched = fit([tb_nanwatch.NanWatchCallback(logdir + "/fit", log_every=4)])
out["bitwise_plain"] = watched == fit([])

# A custom loop through strategy.run: an Inf in replica 0's shard at step 2.
with strategy.scope():
    tf_keras.utils.set_random_seed(0)
    model2 = keras2.Sequential([keras2.Input((8,)), keras2.layers.Dense(4, name="dense")])
    optimizer = keras2.optimizers.SGD(0.01)
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
