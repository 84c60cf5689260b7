"""The demo's training runs, one registry.

* The six example programs of the two articles in ../shared/seeds/ (A-F), as the
  articles wrote them, with the data shrunk where the original is too slow for a
  demo (each function says so).
* The variants that really fail (DESIGN.md's "Realistic variants").
* A fixed run beside a broken one where that is cheap.
* A custom training loop recorded with `tb_nanwatch.Watch`.

Every run is seeded (`keras.utils.set_random_seed(0)` at its start, so a run
gives the same result alone or after the others), logs a row every `LOG_EVERY`
steps, and, once the first non-finite value is on disk, trains `STEPS_AFTER`
more steps so the heatmap shows how it spreads, then stops.

`train(name, logdir)` trains one run into `logdir` and returns what happened
(a dict, also saved as `demo.json` beside the event files).
"""

import collections
import contextlib
import json
import logging
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LOG_EVERY = 1  # short runs (<= 256 steps): one row per step, full statistics each
STEPS_AFTER = 8  # steps trained after the first non-finite record
FACTS_FILE = "demo.json"

Scenario = collections.namedtuple(
    "Scenario", ["name", "kind", "title", "claim", "fn", "fixes", "shrunk"]
)
# kind: "article" (as written), "variant" (DESIGN.md's failing variants),
#       "fixed" (the remedy applied to the run named in `fixes`), "custom loop"

REGISTRY = collections.OrderedDict()


def scenario(name, kind, title, claim, fixes=None, shrunk=""):
    def register(fn):
        REGISTRY[name] = Scenario(name, kind, title, claim, fn, fixes, shrunk)
        return fn

    return register


# --------------------------------------------------------------------------- helpers
def _keras():
    import keras

    return keras


@contextlib.contextmanager
def _dtype_policy(name):
    keras = _keras()
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _finite(value):
    return value is not None and bool(np.isfinite(value))


def _callbacks(logdir, facts, steps_after=STEPS_AFTER):
    """NanWatchCallback plus a recorder of Keras' own per-batch loss that stops
    training `steps_after` steps after the first non-finite record."""
    import tb_nanwatch

    keras = _keras()
    watch_cb = tb_nanwatch.NanWatchCallback(logdir, log_every=LOG_EVERY)

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = -1
            self.after = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            loss = float((logs or {}).get("loss", np.nan))
            facts["steps"] = self.step + 1
            if not np.isfinite(loss) and facts.get("keras_loss_nonfinite_step") is None:
                facts["keras_loss_nonfinite_step"] = self.step
            if watch_cb.watch is not None and watch_cb.watch.first_nonfinite is not None:
                self.after += 1
                if self.after > steps_after:
                    self.model.stop_training = True
                    facts["stopped_early"] = True

        def on_epoch_end(self, epoch, logs=None):
            facts.setdefault("epoch_loss", []).append(float((logs or {}).get("loss", np.nan)))

    return [watch_cb, Recorder()], watch_cb


def _fit(model, x, y, logdir, facts, epochs, batch_size=32, **fit_kwargs):
    callbacks, watch_cb = _callbacks(logdir, facts)
    facts.setdefault("keras_loss_nonfinite_step", None)
    model.fit(
        x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=callbacks, **fit_kwargs
    )
    facts["first_nonfinite"] = watch_cb.watch.first_nonfinite
    facts["final_loss"] = facts.get("epoch_loss", [None])[-1]
    return facts


def _two_layer_binary(kernel_initializer="glorot_uniform"):
    """The articles' Dense(16, relu) -> Dense(1, sigmoid) on 20 features."""
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((20,)),  # the articles pass input_shape=(20,), deprecated in Keras 3
            keras.layers.Dense(16, activation="relu", kernel_initializer=kernel_initializer),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


def _mlp_784(n_samples):
    """Article 2, example 1: the 784-1024x3-10 MLP on standard normal samples."""
    import tensorflow as tf

    keras = _keras()
    x = tf.random.normal((n_samples, 784))
    y = keras.utils.to_categorical(
        tf.random.uniform((n_samples,), maxval=10, dtype=tf.int32), num_classes=10
    )
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return model, x, y


def _huge_uniform(n):
    """Article 2, example 3: inputs and targets uniform in +-1e10."""
    import tensorflow as tf

    x = tf.random.uniform((n, 1), minval=-1e10, maxval=1e10, dtype=tf.float32)
    y = tf.random.uniform((n, 1), minval=-1e10, maxval=1e10, dtype=tf.float32)
    return x, y


def handwritten_bce(y_true, y_pred):
    """Binary cross-entropy as people write it by hand: log(0) when p saturates."""
    import tensorflow as tf

    y_true = tf.cast(y_true, y_pred.dtype)
    return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))


def unstable_loss(y_true, y_pred):
    """Article 2, example 2, verbatim."""
    import tensorflow as tf

    return tf.reduce_sum(tf.math.log(tf.math.abs(y_true - y_pred)))


def stable_log_loss(y_true, y_pred):
    """The remedy for `unstable_loss`: log of a distance that cannot be 0."""
    import tensorflow as tf

    return tf.reduce_mean(tf.math.log(tf.math.abs(y_true - y_pred) + 1e-3))


# --------------------------------------------------------------------------- article 1
A_CLAIM = (
    'Inputs in [0, 100] make the gradients explode: "If we run this code, we will see NaN '
    'losses"; inputs in [0, 1] would converge.'
)


@scenario(
    "a_unscaled_inputs",
    "article",
    "A: unscaled inputs (x100), Dense(16, relu) -> Dense(1, sigmoid), adam, BCE",
    A_CLAIM,
)
def a_unscaled_inputs(logdir, facts):
    x = np.random.rand(1000, 20) * 100
    y = np.random.randint(0, 2, size=(1000, 1))
    model = _two_layer_binary()
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return _fit(model, x, y, logdir, facts, epochs=5)


@scenario(
    "a_handwritten_bce",
    "variant",
    "A with a hand-written BCE -mean(t*log(p) + (1-t)*log(1-p))",
    "Same data and model as A. This is what makes A's large activations fatal: the sigmoid "
    "saturates to exactly 0 or 1 and log(0) = -inf.",
)
def a_handwritten_bce(logdir, facts):
    x = np.random.rand(1000, 20) * 100
    y = np.random.randint(0, 2, size=(1000, 1))
    model = _two_layer_binary()
    model.compile(optimizer="adam", loss=handwritten_bce)
    return _fit(model, x, y, logdir, facts, epochs=5)


B_CLAIM = (
    'Kernel initialised uniformly in [10, 20]: "Running this code will likely show NaN losses".'
)


@scenario(
    "b_large_init", "article", "B: first kernel initialised U(10, 20), inputs in [0, 1]", B_CLAIM
)
def b_large_init(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20)
    y = np.random.randint(0, 2, size=(1000, 1))
    model = _two_layer_binary(keras.initializers.RandomUniform(minval=10, maxval=20))
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return _fit(model, x, y, logdir, facts, epochs=5)


@scenario(
    "b_float16_x1000",
    "variant",
    "B under the float16 dtype policy, inputs x1000",
    "Large weights really overflow when the activations are float16 (largest finite value 65504).",
)
def b_float16_x1000(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20) * 1000
    y = np.random.randint(0, 2, size=(1000, 1))
    with _dtype_policy("float16"):
        model = _two_layer_binary(keras.initializers.RandomUniform(minval=10, maxval=20))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return _fit(model, x, y, logdir, facts, epochs=5)


@scenario(
    "b_float16_scaled",
    "variant",
    "B under float16 with the inputs scaled back to [0, 1]",
    "The first remedy that comes to mind for b_float16_x1000. The overflow goes away; training "
    "silently stops instead.",
    fixes="b_float16_x1000",
)
def b_float16_scaled(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20) * 1000
    y = np.random.randint(0, 2, size=(1000, 1))
    x = x / 1000.0
    with _dtype_policy("float16"):
        model = _two_layer_binary(keras.initializers.RandomUniform(minval=10, maxval=20))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return _fit(model, x, y, logdir, facts, epochs=5)


@scenario(
    "b_float16_fixed",
    "fixed",
    "B in half precision done right: mixed_float16, inputs in [0, 1], He init",
    "Scaled inputs, a sane initialiser (both the article's advice) and float32 variables.",
    fixes="b_float16_x1000",
)
def b_float16_fixed(logdir, facts):
    x = np.random.rand(1000, 20) * 1000
    y = np.random.randint(0, 2, size=(1000, 1))
    x = x / 1000.0
    with _dtype_policy("mixed_float16"):
        model = _two_layer_binary("he_uniform")
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return _fit(model, x, y, logdir, facts, epochs=5)


@scenario(
    "c_deep",
    "article",
    "C: three hidden Dense(16, relu) + sigmoid head",
    'Vanishing gradients in a deeper model: "might not immediately yield NaNs" but are a '
    '"pre-cursor to exploding gradients and NaN outputs".',
)
def c_deep(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20)
    y = np.random.randint(0, 2, size=(1000, 1))
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return _fit(model, x, y, logdir, facts, epochs=5)


# --------------------------------------------------------------------------- article 2
D_SAMPLES = 2048  # the article: 100,000 samples, 10 epochs (31,250 steps); here 64 steps per run


@scenario(
    "d_mlp",
    "article",
    "D: 784-1024x3-10 MLP on normal samples, adam, categorical cross-entropy",
    'A deep network is "susceptible to exploding gradients" that overflow to inf; the remedy is '
    "gradient clipping.",
    shrunk="2,048 samples, 1 epoch (64 steps) instead of 100,000 samples, 10 epochs",
)
def d_mlp(logdir, facts):
    model, x, y = _mlp_784(D_SAMPLES)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "d_sgd_lr1",
    "variant",
    "D with SGD(learning_rate=1.0)",
    "The same MLP with a learning rate that really diverges.",
    shrunk="2,048 samples, 1 epoch (64 steps)",
)
def d_sgd_lr1(logdir, facts):
    keras = _keras()
    model, x, y = _mlp_784(D_SAMPLES)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="categorical_crossentropy"
    )
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "d_sgd_lr1_clipnorm",
    "fixed",
    "D with SGD(learning_rate=1.0, clipnorm=1.0)",
    "The article's remedy, gradient clipping, on the variant that really diverges.",
    fixes="d_sgd_lr1",
    shrunk="2,048 samples, 1 epoch (64 steps)",
)
def d_sgd_lr1_clipnorm(logdir, facts):
    keras = _keras()
    model, x, y = _mlp_784(D_SAMPLES)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0, clipnorm=1.0),
        loss="categorical_crossentropy",
    )
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "d_float16",
    "variant",
    "D under the float16 dtype policy (weights and Adam's slots in float16)",
    'A common half-precision mistake: `set_dtype_policy("float16")` instead of "mixed_float16".',
    shrunk="2,048 samples, 1 epoch (64 steps)",
)
def d_float16(logdir, facts):
    with _dtype_policy("float16"):
        model, x, y = _mlp_784(D_SAMPLES)
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "d_mixed_float16",
    "fixed",
    "D under mixed_float16 (float32 weights and slots, loss scaling)",
    "The remedy for d_float16: compute in float16, keep the variables in float32.",
    fixes="d_float16",
    shrunk="2,048 samples, 1 epoch (64 steps)",
)
def d_mixed_float16(logdir, facts):
    with _dtype_policy("mixed_float16"):
        model, x, y = _mlp_784(D_SAMPLES)
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        return _fit(model, x, y, logdir, facts, epochs=1)


E_SEEDS = 20
E_PAIRS = 1000000


@scenario(
    "e_log_abs_diff",
    "article",
    "E: sum(log|a - b|) over 1,000,000 uniform pairs (evaluated, not trained)",
    '"This may produce NaNs due to taking the log of negative numbers or zero"; the sum over a '
    'large array "drastically increases the likelihood".',
    shrunk="not a training run in the article: each step here evaluates the article's expression "
    "on a fresh 1,000,000-pair draw, seeds 0-19 (step = seed)",
)
def e_log_abs_diff(logdir, facts):
    """The article only evaluates the expression once. Here a Keras model with no weights
    computes it layer by layer (a - b, |.|, log), one step per numpy seed; `Watch` records
    each evaluation at `optimizer.apply([])` (there is nothing to update)."""
    import tensorflow as tf

    import tb_nanwatch

    keras = _keras()
    a_in = keras.Input((1,), name="a")
    b_in = keras.Input((1,), name="b")
    diff = keras.layers.Subtract(name="a_minus_b")([a_in, b_in])
    absd = keras.layers.Lambda(tf.math.abs, name="abs")(diff)
    logd = keras.layers.Lambda(tf.math.log, name="log")(absd)
    model = keras.Model([a_in, b_in], logd, name="unstable_loss")
    optimizer = keras.optimizers.SGD()
    watch = tb_nanwatch.Watch(logdir, model, optimizer, log_every=1)

    @tf.function
    def evaluate(a, b):
        terms = model([a, b], training=True)
        loss = watch.record_loss(tf.reduce_sum(terms))
        optimizer.apply([], [])  # no weights: the hook where Watch records the step
        return loss

    values, ties = [], []
    for seed in range(E_SEEDS):
        np.random.seed(seed)
        x = np.random.rand(E_PAIRS).astype(np.float32)  # the article's draw
        y = np.random.rand(E_PAIRS).astype(np.float32)
        loss = float(evaluate(x[:, None], y[:, None]))
        values.append(loss)
        ties.append(int(np.sum(x == y)))
        watch.after_step()
    watch.close()
    facts.update(
        steps=E_SEEDS,
        loss_by_seed=values,
        ties_by_seed=ties,
        first_nonfinite=watch.first_nonfinite,
        final_loss=values[0],
        keras_loss_nonfinite_step=next(
            (i for i, v in enumerate(values) if not np.isfinite(v)), None
        ),
    )
    return facts


def _relu_regression_data(n=1024):
    """Non-negative targets with many exact zeros (amounts, counts, durations)."""
    x = np.random.normal(size=(n, 8)).astype(np.float32)
    w = np.random.normal(size=(8, 1)).astype(np.float32)
    y = np.maximum(x @ w, 0.0).astype(np.float32)
    return x, y


def _relu_regressor():
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="relu"),
        ]
    )


@scenario(
    "e_loss_relu",
    "variant",
    "E's sum(log|y - p|) as the training loss of a ReLU regressor",
    "The article's loss where it really bites: a ReLU output is exactly 0 wherever the target is 0.",
)
def e_loss_relu(logdir, facts):
    x, y = _relu_regression_data()
    model = _relu_regressor()
    model.compile(optimizer="adam", loss=unstable_loss)
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "e_loss_relu_fixed",
    "fixed",
    "The ReLU regressor with mean(log(|y - p| + 1e-3))",
    "A distance that cannot reach 0 (or plain MSE, as the article suggests).",
    fixes="e_loss_relu",
)
def e_loss_relu_fixed(logdir, facts):
    x, y = _relu_regression_data()
    model = _relu_regressor()
    model.compile(optimizer="adam", loss=stable_log_loss)
    return _fit(model, x, y, logdir, facts, epochs=2)


F_SAMPLES = 1000000


@scenario(
    "f_huge_data",
    "article",
    "F: inputs and targets uniform in +-1e10, Dense(1), adam, mse",
    '"Numerical instability can arise due to the large magnitude of values"; standardise the data.',
    shrunk="the article's 1,000,000 samples, but training stops 8 steps after the first non-finite "
    "value (the article: 10 epochs, 312,500 steps)",
)
def f_huge_data(logdir, facts):
    keras = _keras()
    x, y = _huge_uniform(F_SAMPLES)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


F_FIXED_SAMPLES = 4096


@scenario(
    "f_standardised",
    "fixed",
    "F with inputs and targets standardised (mean 0, std 1)",
    "The article's remedy.",
    fixes="f_huge_data",
    shrunk="4,096 samples, 2 epochs (256 steps)",
)
def f_standardised(logdir, facts):
    keras = _keras()
    x, y = _huge_uniform(F_SAMPLES)
    x, y = x[:F_FIXED_SAMPLES].numpy(), y[:F_FIXED_SAMPLES].numpy()
    x = (x - x.mean()) / x.std()
    y = (y - y.mean()) / y.std()
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=2)


# --------------------------------------------------------------------------- custom loop
def _pairs_data(n_items=256, n_classes=8, n_pairs=2048):
    """Items of 8 classes; pairs drawn with replacement, so now and then a pair is an
    item with itself (i == j), as simple pair samplers do."""
    labels = np.random.randint(0, n_classes, n_items)
    centers = np.random.normal(size=(n_classes, 16)).astype(np.float32)
    feats = (centers[labels] + 0.5 * np.random.normal(size=(n_items, 16))).astype(np.float32)
    i = np.random.randint(0, n_items, n_pairs)
    j = np.random.randint(0, n_items, n_pairs)
    same = (labels[i] == labels[j]).astype(np.float32)
    return feats, i, j, same


def _custom_loop(logdir, facts, eps):
    """A contrastive loss in a hand-written loop: embed both items of each pair (one
    batch, one model call), pull same-class pairs together by their distance D, push
    other pairs beyond a margin: mean(same * D + (1 - same) * relu(1 - D))."""
    import tensorflow as tf

    import tb_nanwatch

    keras = _keras()
    feats, ii, jj, same = _pairs_data()
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(8)],
        name="embedder",
    )
    optimizer = keras.optimizers.Adam(1e-2)
    watch = tb_nanwatch.Watch(logdir, model, optimizer, log_every=LOG_EVERY)

    @tf.function
    def train_step(xi, xj, s):
        with tf.GradientTape() as tape:
            emb = model(tf.concat([xi, xj], 0), training=True)
            ei, ej = tf.split(emb, 2)
            if eps:
                dist = tf.sqrt(tf.reduce_sum(tf.square(ei - ej), axis=1) + eps)
            else:
                dist = tf.norm(ei - ej, axis=1)
            loss = watch.record_loss(tf.reduce_mean(s * dist + (1 - s) * tf.nn.relu(1.0 - dist)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    batch, step, after, losses = 32, 0, 0, []
    facts["keras_loss_nonfinite_step"] = None
    for epoch in range(2):
        for k in range(0, len(ii), batch):
            sl = slice(k, k + batch)
            loss = float(train_step(feats[ii[sl]], feats[jj[sl]], same[sl]))
            losses.append(loss)
            if not np.isfinite(loss) and facts["keras_loss_nonfinite_step"] is None:
                facts["keras_loss_nonfinite_step"] = step
            step += 1
            if watch.after_step():
                after += 1
            if after > STEPS_AFTER:
                break
        if after > STEPS_AFTER:
            facts["stopped_early"] = True
            break
    watch.close()
    first = watch.first_nonfinite
    self_pair_steps = [
        k // batch
        for k in range(0, len(ii), batch)
        if np.any(ii[k : k + batch] == jj[k : k + batch])
    ]
    facts.update(
        steps=step,
        first_nonfinite=first,
        final_loss=losses[-1],
        self_pair_steps=self_pair_steps,
        loss_at_first_nonfinite=losses[first["step"]] if first else None,
    )
    return facts


@scenario(
    "custom_pair_distance",
    "custom loop",
    "Custom loop (Watch): contrastive loss on tf.norm(e_i - e_j), pairs sampled with replacement",
    "Not from the articles: a NaN the loss does not show in time. The gradient of tf.norm at a "
    "zero vector is 0/0 = NaN, and a pair sampler now and then pairs an item with itself.",
)
def custom_pair_distance(logdir, facts):
    return _custom_loop(logdir, facts, eps=None)


@scenario(
    "custom_pair_distance_fixed",
    "fixed",
    "The same loop with D = sqrt(sum((e_i - e_j)^2) + 1e-12)",
    "A distance whose gradient is defined at 0 (or: drop i == j pairs).",
    fixes="custom_pair_distance",
)
def custom_pair_distance_fixed(logdir, facts):
    return _custom_loop(logdir, facts, eps=1e-12)


# --------------------------------------------------------------------------- one run per cause
# Each cause of tb_nanwatch/causes.py that no article run shows first gets a small run that
# does, and a fixed run with the cause's remedy applied (tests/test_diagnosis_demo.py checks
# that the diagnosis names the cause first and the fixed run stays finite).
def _regression_data(n=1024, features=8, target_scale=1.0):
    x = np.random.normal(size=(n, features)).astype(np.float32)
    w = np.random.normal(size=(features, 1)).astype(np.float32)
    y = (x @ w + 0.1 * np.random.normal(size=(n, 1))).astype(np.float32) * target_scale
    return x, y


def _linear_model(features=8):
    keras = _keras()
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(1)])


LR_LIMIT_SGD = 0.9  # just above the stable limit of SGD on this regression at batch 32


@scenario(
    "lr_gradual",
    "variant",
    "Linear regression, SGD learning rate just above the stable limit",
    "Not from the articles: the weights oscillate with a growing amplitude for a few hundred steps; "
    "nothing is non-finite until the very end. The early warning comes long before.",
    shrunk="1,024 samples, up to 40 epochs (1,280 steps), stops 8 steps after the first non-finite value",
)
def lr_gradual(logdir, facts):
    keras = _keras()
    x, y = _regression_data()
    model = _linear_model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR_LIMIT_SGD), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=40)


@scenario(
    "lr_gradual_fixed",
    "fixed",
    "The same regression with SGD(learning_rate=0.1)",
    "The remedy for learning_rate_too_high: a learning rate below the stable limit.",
    fixes="lr_gradual",
    shrunk="1,024 samples, 4 epochs (128 steps)",
)
def lr_gradual_fixed(logdir, facts):
    keras = _keras()
    x, y = _regression_data()
    model = _linear_model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=4)


def _with_missing_value(x):
    x = x.copy()
    x[700, 3] = np.nan  # one missing measurement, as a CSV with an empty cell gives
    return x


@scenario(
    "nan_in_data",
    "variant",
    "A regression whose data holds one NaN (an empty CSV cell)",
    "Not from the articles: nothing in the model is wrong; the batch that holds row 700 is NaN.",
)
def nan_in_data(logdir, facts):
    x, y = _regression_data()
    model = _linear_model()
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, _with_missing_value(x), y, logdir, facts, epochs=1)


@scenario(
    "nan_in_data_fixed",
    "fixed",
    "The same data with the missing value imputed (column mean)",
    "The remedy for nonfinite_input.",
    fixes="nan_in_data",
)
def nan_in_data_fixed(logdir, facts):
    x, y = _regression_data()
    x = _with_missing_value(x)
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x).astype(np.float32)
    model = _linear_model()
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


def _label_pipeline(drop_nonfinite):
    """A tf.data pipeline whose labels hold one NaN (a failed join in the label table)."""
    import tensorflow as tf

    x, y = _regression_data()
    y = y.copy()
    y[500, 0] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if drop_nonfinite:  # the remedy: drop the rows whose labels are not finite, before batching
        dataset = dataset.filter(lambda x, y: tf.reduce_all(tf.math.is_finite(y)))
    return dataset.batch(32)


@scenario(
    "nan_label",
    "variant",
    "A regression fed by tf.data whose labels hold one NaN",
    "Not from the articles: the inputs and the model are fine; the labels of the batch holding "
    "row 500 are NaN, so the loss is NaN at that step.",
)
def nan_label(logdir, facts):
    model = _linear_model()
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, _label_pipeline(False), None, logdir, facts, epochs=1, batch_size=None)


@scenario(
    "nan_label_filtered",
    "fixed",
    "The same pipeline with dataset.filter dropping rows whose labels are not finite",
    "The remedy for nonfinite_target.",
    fixes="nan_label",
)
def nan_label_filtered(logdir, facts):
    model = _linear_model()
    model.compile(optimizer="adam", loss="mse")
    return _fit(model, _label_pipeline(True), None, logdir, facts, epochs=1, batch_size=None)


def _small_mlp(features=8, **dense_kwargs):
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="relu", **dense_kwargs),
            keras.layers.Dense(1),
        ]
    )


@scenario(
    "targets_in_dollars",
    "variant",
    "An MLP regression on targets in the 1e5 range (prices), SGD",
    "Not from the articles: standardised inputs, but the targets are not; the huge residuals make "
    "SGD's first updates huge.",
)
def targets_in_dollars(logdir, facts):
    keras = _keras()
    x, y = _regression_data(target_scale=1e5)
    model = _small_mlp()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "targets_in_dollars_fixed",
    "fixed",
    "The same regression with the targets standardised",
    "The remedy for unscaled_targets.",
    fixes="targets_in_dollars",
)
def targets_in_dollars_fixed(logdir, facts):
    keras = _keras()
    x, y = _regression_data(target_scale=1e5)
    y = (y - y.mean()) / y.std()
    model = _small_mlp()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=2)


def _deep_relu(init, depth=6, width=64):
    keras = _keras()
    layers = [keras.Input((20,))]
    layers += [
        keras.layers.Dense(width, activation="relu", kernel_initializer=init) for _ in range(depth)
    ]
    layers += [keras.layers.Dense(1)]
    return keras.Sequential(layers)


@scenario(
    "large_init_deep",
    "variant",
    "B's U(10, 20) kernels in a 6-layer ReLU regression, SGD",
    "B's initialiser where it really bites: depth multiplies the scale layer after layer.",
)
def large_init_deep(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20).astype(np.float32)
    y = np.random.rand(1000, 1).astype(np.float32)
    model = _deep_relu(keras.initializers.RandomUniform(minval=10, maxval=20))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "large_init_deep_fixed",
    "fixed",
    "The same network with he_uniform kernels",
    "The remedy for large_initial_weights.",
    fixes="large_init_deep",
)
def large_init_deep_fixed(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20).astype(np.float32)
    y = np.random.rand(1000, 1).astype(np.float32)
    model = _deep_relu("he_uniform")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


def _deep_linear(depth=12, width=32, gain=3.0):
    keras = _keras()
    init = keras.initializers.RandomNormal(stddev=gain / np.sqrt(width))
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, kernel_initializer=init) for _ in range(depth)]
    layers += [keras.layers.Dense(1)]
    return keras.Sequential(layers)


@scenario(
    "deep_linear_gain3",
    "variant",
    "12 linear layers, each multiplying by about 3 (2x the He scale)",
    "Not from the articles: no single layer looks wrong, but gradients multiply backward "
    "through twelve of them.",
)
def deep_linear_gain3(logdir, facts):
    keras = _keras()
    x = np.random.normal(size=(1024, 32)).astype(np.float32)
    y = np.random.normal(size=(1024, 1)).astype(np.float32)
    model = _deep_linear()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "deep_linear_gain3_clipnorm",
    "fixed",
    "The same network with SGD(clipnorm=1.0)",
    "The remedy for exploding_gradients: clipped gradients.",
    fixes="deep_linear_gain3",
)
def deep_linear_gain3_clipnorm(logdir, facts):
    keras = _keras()
    x = np.random.normal(size=(1024, 32)).astype(np.float32)
    y = np.random.normal(size=(1024, 1)).astype(np.float32)
    model = _deep_linear()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, clipnorm=1.0), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "dead_relu",
    "variant",
    "A ReLU layer whose bias starts at -10: every unit dead from step 0",
    "Not from the articles, and finite: the first layer's output and gradients are exactly 0, so "
    "it never trains.",
)
def dead_relu(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20).astype(np.float32)
    y = np.random.randint(0, 2, size=(1000, 1))
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(
                16, activation="relu", bias_initializer=keras.initializers.Constant(-10.0)
            ),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "dead_relu_fixed",
    "fixed",
    "The same model with a zero bias and leaky_relu",
    "The remedy for vanishing_gradients.",
    fixes="dead_relu",
)
def dead_relu_fixed(logdir, facts):
    keras = _keras()
    x = np.random.rand(1000, 20).astype(np.float32)
    y = np.random.randint(0, 2, size=(1000, 1))
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16, activation="leaky_relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return _fit(model, x, y, logdir, facts, epochs=2)


@scenario(
    "targets_mixed_float16",
    "variant",
    "mixed_float16 regression on targets in the 1e7 range",
    "Not from the articles, and finite: the gradient w.r.t. the float16 output is above 65504 even "
    "unscaled, so the LossScaleOptimizer skips every step and lowers the scale below 1.",
)
def targets_mixed_float16(logdir, facts):
    x, y = _regression_data(target_scale=1e7)
    with _dtype_policy("mixed_float16"):
        model = _small_mlp()
        model.compile(optimizer="adam", loss="mse")
        return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "targets_mixed_float16_fixed",
    "fixed",
    "The same regression with the targets standardised",
    "The remedy for loss_scale_collapse here: nothing left that overflows float16.",
    fixes="targets_mixed_float16",
)
def targets_mixed_float16_fixed(logdir, facts):
    x, y = _regression_data(target_scale=1e7)
    y = (y - y.mean()) / y.std()
    with _dtype_policy("mixed_float16"):
        model = _small_mlp()
        model.compile(optimizer="adam", loss="mse")
        return _fit(model, x, y, logdir, facts, epochs=1)


def _sentinel_data():
    """A regression whose target column marks one missing value with a sentinel, 1e19."""
    x, y = _regression_data()
    y[700] = 1e19
    return x, y


@scenario(
    "sentinel_target",
    "variant",
    "A summed-MSE regression, Adam, one target set to a 1e19 sentinel",
    "Not from the articles: the loss of the batch with the sentinel is 1e38, still finite, but Adam "
    "squares its gradient (2e19) for the velocity, and g^2 passes float32's largest value.",
)
def sentinel_target(logdir, facts):
    keras = _keras()
    x, y = _sentinel_data()
    model = _linear_model()
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError(reduction="sum"))
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "sentinel_target_clipnorm",
    "fixed",
    "The same regression with Adam(clipnorm=1.0)",
    "The remedy for optimizer_state_overflow: the gradient is clipped before Adam squares it "
    "(dropping the sentinel row is the better fix of the data).",
    fixes="sentinel_target",
)
def sentinel_target_clipnorm(logdir, facts):
    keras = _keras()
    x, y = _sentinel_data()
    model = _linear_model()
    model.compile(
        optimizer=keras.optimizers.Adam(clipnorm=1.0),
        loss=keras.losses.MeanSquaredError(reduction="sum"),
    )
    return _fit(model, x, y, logdir, facts, epochs=1)


def _token_data(n=512, vocab=200, used=100, length=6):
    """Token sequences that use only the first `used` ids of a `vocab`-row table: the other rows
    never get a gradient (ids reserved for later, a vocabulary built on more data)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, used, size=(n, length)).astype("int32")
    y = (tokens.mean(axis=1, keepdims=True) / used - 0.5).astype("float32")
    return tokens, y


def _token_model(vocab=200):
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(vocab, 16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )


@scenario(
    "adam_epsilon_zero",
    "variant",
    "An embedding model trained with Adam(epsilon=0)",
    "Not from the articles: rows of the embedding table that no batch uses keep m = v = 0, and "
    "Adam's update m / (sqrt(v) + epsilon) is 0 / 0 = NaN there at the first step.",
)
def adam_epsilon_zero(logdir, facts):
    keras = _keras()
    tokens, y = _token_data()
    model = _token_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=0.0), loss="mse")
    return _fit(model, tokens, y, logdir, facts, epochs=1)


@scenario(
    "adam_epsilon_default",
    "fixed",
    "The same model with Adam's default epsilon (1e-7)",
    "The remedy for optimizer_zero_division.",
    fixes="adam_epsilon_zero",
)
def adam_epsilon_default(logdir, facts):
    keras = _keras()
    tokens, y = _token_data()
    model = _token_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return _fit(model, tokens, y, logdir, facts, epochs=1)


def _sequence_data(n=256, steps=200):
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((n, steps, 2))).astype("float32")
    y = x[:, -20:, :1].mean(axis=1).astype("float32")
    return x, y


def _recurrent_model(activation, gain):
    keras = _keras()
    return keras.Sequential(
        [
            keras.Input((200, 2)),
            keras.layers.SimpleRNN(
                16,
                activation=activation,
                recurrent_initializer=keras.initializers.Identity(gain=gain),
            ),
            keras.layers.Dense(1),
        ]
    )


@scenario(
    "irnn_long",
    "variant",
    "A ReLU SimpleRNN with an identity recurrent kernel (an IRNN) of gain 1.2 over 200 steps",
    "Not from the articles: identity initialisation keeps a ReLU RNN's state, and a gain a little "
    "above 1 multiplies it 1.2x per time step: 1.2^200 overflows float32 in the forward pass.",
)
def irnn_long(logdir, facts):
    keras = _keras()
    x, y = _sequence_data()
    model = _recurrent_model("relu", 1.2)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


@scenario(
    "irnn_tanh",
    "fixed",
    "The same RNN with tanh (Keras' default activation), whose state stays in [-1, 1]",
    "The remedy for recurrent_explosion.",
    fixes="irnn_long",
)
def irnn_tanh(logdir, facts):
    keras = _keras()
    x, y = _sequence_data()
    model = _recurrent_model("tanh", 1.2)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return _fit(model, x, y, logdir, facts, epochs=1)


# The demo run of each cause (tb_nanwatch/causes.py) whose diagnosis names it first, and the
# run with its remedy applied, which stays finite.  tests/test_diagnosis_demo.py trains and checks them.
CAUSE_DEMOS = collections.OrderedDict(
    [
        ("nonfinite_input", ("nan_in_data", "nan_in_data_fixed")),
        ("nonfinite_target", ("nan_label", "nan_label_filtered")),
        ("unscaled_inputs", ("f_huge_data", "f_standardised")),
        ("unscaled_targets", ("targets_in_dollars", "targets_in_dollars_fixed")),
        ("large_initial_weights", ("large_init_deep", "large_init_deep_fixed")),
        ("reduced_precision_underflow", ("d_float16", "d_mixed_float16")),
        ("reduced_precision_overflow", ("b_float16_x1000", "b_float16_fixed")),
        ("unstable_loss", ("e_loss_relu", "e_loss_relu_fixed")),
        ("domain_error", ("custom_pair_distance", "custom_pair_distance_fixed")),
        ("learning_rate_too_high", ("lr_gradual", "lr_gradual_fixed")),
        ("exploding_gradients", ("deep_linear_gain3", "deep_linear_gain3_clipnorm")),
        ("recurrent_explosion", ("irnn_long", "irnn_tanh")),
        ("optimizer_state_overflow", ("sentinel_target", "sentinel_target_clipnorm")),
        ("optimizer_zero_division", ("adam_epsilon_zero", "adam_epsilon_default")),
        ("loss_scale_collapse", ("targets_mixed_float16", "targets_mixed_float16_fixed")),
        ("vanishing_gradients", ("dead_relu", "dead_relu_fixed")),
    ]
)
# Runs that must get no cause at all: healthy, mixed precision with loss-scale skips only, and the
# articles' scenarios that stay finite.
NO_CAUSE = (
    "a_unscaled_inputs",
    "b_large_init",
    "c_deep",
    "d_mlp",
    "b_float16_fixed",
    "d_mixed_float16",
    "f_standardised",
    "e_loss_relu_fixed",
)


# --------------------------------------------------------------------------- running
def train(name, logdir):
    """Trains scenario `name` into `logdir` (emptied first); returns its facts."""
    import shutil

    keras = _keras()
    logging.getLogger("tb_nanwatch").setLevel(logging.ERROR)  # run_all prints its own summary
    sc = REGISTRY[name]
    if os.path.isdir(logdir):
        shutil.rmtree(logdir)
    os.makedirs(logdir)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    facts = {"name": name}
    t0 = time.perf_counter()
    sc.fn(logdir, facts)
    facts["train_seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(logdir, FACTS_FILE), "w") as f:
        json.dump(facts, f, indent=1, default=_json_default)
    return facts


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(repr(value))


def load_facts(logdir):
    path = os.path.join(logdir, FACTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
