import json
import sys

import keras
import numpy as np
import tensorflow as tf

import tb_nanwatch

logdir, bad_worker, bad_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    optimizer = keras.optimizers.SGD(0.01)
watch = tb_nanwatch.Watch(logdir, model, optimizer, log_every=2)


def dataset_fn(ctx):
    worker = ctx.input_pipeline_id
    x = np.random.default_rng(worker).normal(size=(10 * 4, 6)).astype("float32")
    if worker == bad_worker:
        x[bad_step * 4 + 1, 2] = np.inf
    return tf.data.Dataset.from_tensor_slices(x).batch(4)


@tf.function
def train_step(x):
    def replica_fn(x):
        with tf.GradientTape() as tape:
            loss = watch.record_loss(tf.reduce_mean(tf.square(model(x, training=True))))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    strategy.run(replica_fn, args=(x,))


for x in strategy.distribute_datasets_from_function(dataset_fn):
    train_step(x)
    watch.after_step()
watch.close()
print(
    "RESULT",
    json.dumps(
        watch.first_nonfinite
        and {k: v for k, v in watch.first_nonfinite.items() if k != "propagators"}
    ),
)
