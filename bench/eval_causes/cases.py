"""Held-out cases for the cause diagnosis: blow-ups and healthy runs, each a small real Keras training.

Written from the cause table's descriptions (docs/causes.md, tb_nanwatch/causes.py) without
reading the rules (tb_nanwatch/diagnosis.py), so the suite measures the rules instead of
repeating them.  Each case is a function `fn(logdir, callbacks)` that builds a model and
trains it with `tb_nanwatch.NanWatchCallback(logdir)` plus the given callbacks (run_eval.py
passes an independent batch counter).  `CASES` lists them in a fixed order; `cause` is the
ground truth from how the case was built (None for a healthy run).

This module imports nothing heavy at import time, so tests can read `CASES` without TensorFlow.
"""

import collections

Case = collections.namedtuple("Case", ["name", "cause", "fn", "what"])


def registry(found):
    """A `@case(cause, what)` decorator that appends each case to the list `found` (every
    suite keeps a `CASES` of its own)."""

    def case(cause, what):
        def register(fn):
            found.append(Case(fn.__name__, cause, fn, what))
            return fn

        return register

    return case


class policy:
    """A global dtype policy for the duration of a case (float32 again after it, even when the
    case fails)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        import keras

        keras.mixed_precision.set_global_policy(self.name)

    def __exit__(self, *exc):
        import keras

        keras.mixed_precision.set_global_policy("float32")


CASES = []
case = registry(CASES)


def _tf():
    import keras
    import numpy as np
    import tensorflow as tf

    import tb_nanwatch

    return keras, np, tf, tb_nanwatch


# Keyword arguments of every case's NanWatchCallback: run_eval.py's replay pass sets
# on_nonfinite="stop" to get the failing step's repro bundle.
WATCH_OPTIONS = {}


def _fit(model, x, y=None, logdir=None, callbacks=(), epochs=3, batch_size=32, **kw):
    import tb_nanwatch

    cbs = [tb_nanwatch.NanWatchCallback(logdir, **WATCH_OPTIONS)] + list(callbacks)
    return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=cbs, **kw)


def _standard(np, n=512, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    w = rng.standard_normal((d, 1)).astype("float32")
    return rng, x, (x @ w).astype("float32")


# --------------------------------------------------------------------------------- nonfinite_input


@case("nonfinite_input", "MLP regression on a numpy array with a NaN in one row (batch 3)")
def input_nan_row(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np)
    x[100, 2] = np.nan
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case("nonfinite_input", "tf.data pipeline dividing a feature by a column that is 0 in one element")
def input_pipeline_ratio(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(1)
    raw = rng.uniform(1, 2, (384, 10)).astype("float32")
    raw[200, 0] = 0.0  # a denominator of 0: x / 0 = Inf
    y = rng.integers(0, 3, 384)
    ds = tf.data.Dataset.from_tensor_slices((raw, y)).map(lambda r, t: (r[1:] / r[0], t)).batch(32)
    model = keras.Sequential(
        [
            keras.Input((9,)),
            keras.layers.Reshape((9, 1)),
            keras.layers.Conv1D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, ds, None, logdir, callbacks)


@case("nonfinite_input", "LSTM over sequences, one sequence holds +Inf (a sensor glitch)")
def input_inf_sequence(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 12, 4)).astype("float32")
    x[70, 5, 1] = np.inf
    y = x.sum(axis=(1, 2))[:, None]
    model = keras.Sequential([keras.Input((12, 4)), keras.layers.LSTM(8), keras.layers.Dense(1)])
    model.compile("rmsprop", "mse")
    _fit(model, x, y, logdir, callbacks, shuffle=False)


# -------------------------------------------------------------------------------- nonfinite_target


@case("nonfinite_target", "tf.data label pipeline taking log of a target that is 0 (-Inf label)")
def target_log_zero(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((320, 6)).astype("float32")
    price = np.exp(x[:, 0] * 0.3).astype("float32")
    price[150] = 0.0
    ds = tf.data.Dataset.from_tensor_slices((x, price)).map(lambda a, p: (a, tf.math.log(p)))
    ds = ds.batch(32)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    _fit(model, ds, None, logdir, callbacks)


@case("nonfinite_target", "per-sample weights from a 0/0 normaliser (a group with no members)")
def target_sample_weight_nan(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 5)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    group = rng.integers(0, 4, 256)
    group[64:96] = 7  # a group the reference table never saw
    ref_group = rng.integers(0, 4, 1000)
    ref_y = rng.integers(0, 2, 1000)
    ref_n = np.bincount(ref_group, minlength=8).astype("float32")
    ref_pos = np.bincount(ref_group, weights=ref_y, minlength=8).astype("float32")
    with np.errstate(invalid="ignore"):
        rate = ref_pos / ref_n  # 0/0 = NaN for the groups it never saw
    sw = (1.0 / (rate[group] + 0.5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks, sample_weight=sw, shuffle=False)


@case("nonfinite_target", "two-output model, the second output's labels hold NaN in one batch")
def target_multi_output(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 8)).astype("float32")
    y1 = (x[:, 0] > 0).astype("int32")
    y2 = x[:, 1:2] * 2.0
    y2[130] = np.nan
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    out1 = keras.layers.Dense(2, name="cls")(h)
    out2 = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(inp, {"cls": out1, "reg": out2})
    model.compile(
        "adam",
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
    )
    _fit(model, x, {"cls": y1, "reg": y2}, logdir, callbacks, shuffle=False)


# --------------------------------------------------------------------------------- unscaled_inputs


@case("unscaled_inputs", "regression on raw unix timestamps (~1.7e9) with SGD")
def inputs_timestamps(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(6)
    t = rng.uniform(1.6e9, 1.8e9, (256, 1)).astype("float32")
    other = rng.standard_normal((256, 3)).astype("float32")
    x = np.concatenate([t, other], axis=1)
    y = other.sum(axis=1, keepdims=True)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unscaled_inputs", "Conv1D regression on raw price windows in the millions, SGD")
def inputs_raw_prices(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(7)
    walk = 2e6 + np.cumsum(rng.standard_normal((256, 10, 1)) * 5e4, axis=1)
    x = walk.astype("float32")
    y = ((walk[:, -1] - walk[:, 0]) / 1.5e5).astype("float32")  # a standardised move
    model = keras.Sequential(
        [
            keras.Input((10, 1)),
            keras.layers.Conv1D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "unscaled_inputs",
    "CNN regression on images stored as raw 16-bit sensor counts times a gain of 1e3",
)
def inputs_raw_counts(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(8)
    x = (rng.integers(0, 65535, (192, 8, 8, 1)) * 1e3).astype("float32")
    y = rng.standard_normal((192, 1)).astype("float32")  # a standardised quality score
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


# -------------------------------------------------------------------------------- unscaled_targets


@case("unscaled_targets", "house prices in cents (~1e9) as MSE targets, SGD")
def targets_cents(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=9)
    y = (3e9 + 1e9 * x[:, :1]).astype("float32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unscaled_targets", "targets around 1e20 (a unit mix-up): the MSE is +Inf at once")
def targets_inf_loss(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=10)
    y = (y * 1e20).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unscaled_targets", "tf.data pipeline of energy readings in joules (~1e8), momentum SGD")
def targets_joules(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=11, d=6)
    y = (np.abs(y) * 1e8 + 5e8).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=0).batch(64)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    _fit(model, ds, None, logdir, callbacks)


# --------------------------------------------------------------------------- large_initial_weights


@case("large_initial_weights", "6-layer ReLU MLP initialised with stddev 5 (He would be ~0.18)")
def init_deep_mlp(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=12, d=64)
    init = keras.initializers.RandomNormal(stddev=5.0, seed=1)
    layers = [keras.Input((64,))]
    layers += [keras.layers.Dense(64, activation="relu", kernel_initializer=init) for _ in range(6)]
    layers += [keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("large_initial_weights", "Embedding table initialised with stddev 1e4")
def init_big_embedding(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(13)
    tokens = rng.integers(0, 50, (256, 6))
    y = (tokens.mean(axis=1, keepdims=True) / 50).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(
                50, 16, embeddings_initializer=keras.initializers.RandomNormal(stddev=1e4, seed=2)
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, tokens, y, logdir, callbacks)


@case("large_initial_weights", "SimpleRNN, linear, recurrent kernel stddev 1 over 40 steps")
def init_recurrent_gain(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(14)
    x = rng.standard_normal((128, 40, 4)).astype("float32")
    y = x[:, -1, :1]
    model = keras.Sequential(
        [
            keras.Input((40, 4)),
            keras.layers.SimpleRNN(
                32,
                activation="linear",
                recurrent_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=3),
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks)


@case("large_initial_weights", "custom bilinear layer whose add_weight matrix has stddev 300")
def init_custom_weight(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Bilinear(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(
                shape=(shape[-1], shape[-1]),
                initializer=keras.initializers.RandomNormal(stddev=300.0, seed=4),
                name="interaction",
            )

        def call(self, x):
            return tf.reduce_sum((x @ self.w) * x, axis=-1, keepdims=True) @ tf.ones((1, 4))

    rng, x, y = _standard(np, seed=15, d=16)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16), Bilinear(), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.01), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("large_initial_weights", "two Conv2D layers initialised with stddev 20")
def init_big_conv(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(16)
    x = rng.standard_normal((128, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 4, 128)
    init = keras.initializers.RandomNormal(stddev=20.0, seed=5)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=init),
            keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=init),
            keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=init),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(4),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, x, y, logdir, callbacks)


# --------------------------------------------------------------------- reduced_precision_overflow


@case("reduced_precision_overflow", "mixed_float16 attention with a hand-written exp/sum softmax")
def fp16_manual_softmax(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class NaiveAttention(keras.layers.Layer):
        def call(self, q):
            scores = tf.matmul(q, q, transpose_b=True)
            e = tf.exp(scores)  # float16: exp(x) is Inf above x = 11.1
            return tf.matmul(e / tf.reduce_sum(e, axis=-1, keepdims=True), q)

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.default_rng(17)
        x = (rng.standard_normal((128, 10, 8)) * 2).astype("float32")
        y = rng.integers(0, 2, 128)
        model = keras.Sequential(
            [
                keras.Input((10, 8)),
                keras.layers.Dense(16),
                NaiveAttention(),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        _fit(model, x, y, logdir, callbacks)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@case("reduced_precision_overflow", "mixed_float16 custom energy layer: sum of squares in float16")
def fp16_sum_squares(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Energy(keras.layers.Layer):
        def call(self, x):
            return tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.default_rng(18)
        x = (rng.standard_normal((128, 32)) * 3).astype("float32")
        y = rng.standard_normal((128, 1)).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(
                    64, kernel_initializer=keras.initializers.RandomNormal(stddev=8.0, seed=6)
                ),
                Energy(),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile("adam", "mse")
        _fit(model, x, y, logdir, callbacks)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@case("reduced_precision_overflow", "float16 Dense with exponential activation under mixed_float16")
def fp16_exponential_activation(logdir, callbacks):
    keras, np, tf, _ = _tf()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.default_rng(19)
        x = (rng.standard_normal((128, 16)) * 4).astype("float32")
        y = rng.standard_normal((128, 1)).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(
                    16,
                    activation="exponential",
                    kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=7),
                ),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile("adam", "mse")
        _fit(model, x, y, logdir, callbacks)
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------------- unstable_loss


@case("unstable_loss", "hand-written Poisson loss log(y_pred) on a ReLU output (log 0)")
def loss_log_relu(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=20)
    y = rng.poisson(3.0, (512, 1)).astype("float32")

    def poisson(y_true, y_pred):
        return tf.reduce_mean(y_pred - y_true * tf.math.log(y_pred))

    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, "relu"),
        ]
    )
    model.compile("adam", poisson)
    _fit(model, x, y, logdir, callbacks)


@case("unstable_loss", "hand-written MAPE dividing by targets that can be 0")
def loss_mape_zero(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=21)
    y = np.round(y).astype("float32")  # some targets are exactly 0

    def mape(y_true, y_pred):
        return tf.reduce_mean(tf.abs(y_true - y_pred) / tf.abs(y_true))

    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile("adam", mape)
    _fit(model, x, y, logdir, callbacks)


@case("unstable_loss", "hand-written KL divergence sum(p log(p / q)) with one-hot p (0 log 0)")
def loss_kl_onehot(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=22)
    y = keras.utils.to_categorical(rng.integers(0, 4, 512), 4).astype("float32")

    def kl(p, q):
        return tf.reduce_mean(tf.reduce_sum(p * tf.math.log(p / q), axis=-1))

    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", kl)
    _fit(model, x, y, logdir, callbacks)


@case("unstable_loss", "hand-written binary cross-entropy on a sigmoid that saturates")
def loss_bce_saturated(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=23)
    y = (x[:, :1] > 0).astype("float32")

    def bce(y_true, p):
        return -tf.reduce_mean(y_true * tf.math.log(p) + (1 - y_true) * tf.math.log(1 - p))

    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1, "sigmoid")]
    )
    model.compile(keras.optimizers.Adam(0.05), bce)
    _fit(model, x * 4.0, y, logdir, callbacks, epochs=12)


# ------------------------------------------------------------------------------------ domain_error


@case("domain_error", "custom layer taking log of ReLU features (log 0 = -Inf)")
def domain_log_features(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class LogFeatures(keras.layers.Layer):
        def call(self, x):
            return tf.math.log(x)

    rng, x, y = _standard(np, seed=24)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            LogFeatures(),
            keras.layers.Dense(1),
        ]
    )
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks)


@case("domain_error", "distance layer tf.norm(x - center) with all-zero rows (gradient at 0)")
def domain_norm_zero(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class DistanceToCenter(keras.layers.Layer):
        def build(self, shape):
            self.center = self.add_weight(shape=(shape[-1],), initializer="zeros", name="center")

        def call(self, x):
            return tf.norm(x - self.center, axis=-1, keepdims=True)

    rng, x, y = _standard(np, seed=25)
    x[0:8] = 0.0  # padding rows, at the centre where the layer starts
    model = keras.Sequential([keras.Input((8,)), DistanceToCenter(), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case("domain_error", "custom power layer x ** 1.5 on a linear Dense output (negative base)")
def domain_fractional_power(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Power(keras.layers.Layer):
        def call(self, x):
            return tf.pow(x, 1.5)

    rng, x, y = _standard(np, seed=26)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8), Power(), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks)


@case("domain_error", "custom normaliser x / sum(x) over ReLU features that can all be 0")
def domain_zero_sum(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class SumNormalise(keras.layers.Layer):
        def call(self, x):
            return x / tf.reduce_sum(x, axis=-1, keepdims=True)

    rng = np.random.default_rng(27)
    x = rng.standard_normal((256, 4)).astype("float32")
    x[40:48] = -np.abs(x[40:48]) - 1.0  # rows whose ReLU features are all 0
    y = rng.integers(0, 2, 256)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                3, activation="relu", kernel_initializer="ones", bias_initializer="zeros"
            ),
            SumNormalise(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, x, y, logdir, callbacks, shuffle=False)


# -------------------------------------------------------------------------- learning_rate_too_high


@case("learning_rate_too_high", "MLP classifier, SGD learning_rate=20")
def lr_sgd_huge(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=28, d=20)
    y = rng.integers(0, 5, 512)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(5),
        ]
    )
    model.compile(
        keras.optimizers.SGD(20.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, x, y, logdir, callbacks, epochs=6)


@case("learning_rate_too_high", "linear regression, SGD momentum 0.9, learning_rate=3")
def lr_momentum_regression(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=29)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(3.0, momentum=0.9), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=20)


@case("learning_rate_too_high", "an ExponentialDecay schedule with decay_rate 2 (it grows)")
def lr_growing_schedule(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=30)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=4, decay_rate=2.0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(schedule), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=20)


@case("learning_rate_too_high", "CNN regression, SGD learning_rate=1.0")
def lr_cnn(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(31)
    x = rng.standard_normal((256, 10, 10, 1)).astype("float32")
    y = x.mean(axis=(1, 2)) * 3
    model = keras.Sequential(
        [
            keras.Input((10, 10, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1.0), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=10)


# ----------------------------------------------------------------------------- exploding_gradients


@case("exploding_gradients", "20-layer plain ReLU MLP, no normalisation, loss summed, SGD 0.01")
def grad_deep_plain(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=32, d=32)
    init = keras.initializers.HeNormal(seed=8)
    layers = [keras.Input((32,))]
    layers += [
        keras.layers.Dense(32, activation="relu", kernel_initializer=init) for _ in range(20)
    ]
    layers += [keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(reduction="sum"))
    _fit(model, x, y * 10, logdir, callbacks, epochs=6)


@case("exploding_gradients", "SimpleRNN (ReLU) over 80 steps, backprop through time, SGD 0.05")
def grad_rnn_bptt(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(33)
    x = rng.standard_normal((128, 80, 2)).astype("float32")
    y = x[:, 0, :1] * 5
    model = keras.Sequential(
        [
            keras.Input((80, 2)),
            keras.layers.SimpleRNN(
                16,
                activation="relu",
                recurrent_initializer=keras.initializers.Orthogonal(gain=1.2, seed=9),
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=6)


@case("exploding_gradients", "3 stacked SimpleRNNs (tanh) over 60 steps, SGD 0.5, no clipping")
def grad_stacked_rnn(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(34)
    x = rng.standard_normal((128, 60, 3)).astype("float32")
    y = x[:, :5, 0].sum(axis=1, keepdims=True)
    model = keras.Sequential(
        [
            keras.Input((60, 3)),
            keras.layers.SimpleRNN(32, return_sequences=True),
            keras.layers.SimpleRNN(32, return_sequences=True),
            keras.layers.SimpleRNN(32),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(0.5), keras.losses.MeanSquaredError(reduction="sum"))
    _fit(model, x, y, logdir, callbacks, epochs=6)


# ------------------------------------------------------------------------ optimizer_state_overflow


@case("optimizer_state_overflow", "Adam with loss_weights=1e20 (a typo): g^2 overflows in v")
def slot_adam_loss_weight(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=35)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse", loss_weights=[1e20])
    _fit(model, x, y, logdir, callbacks)


@case("optimizer_state_overflow", "Adagrad accumulating g^2 of a loss multiplied by 1e18")
def slot_adagrad_accumulator(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=36)

    def scaled_mse(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred)) * 1e18

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adagrad(0.01), scaled_mse)
    _fit(model, x, y, logdir, callbacks, epochs=6)


@case("optimizer_state_overflow", "RMSprop on an Embedding model, loss summed over a 1e19 scale")
def slot_rmsprop_embedding(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(37)
    tokens = rng.integers(0, 30, (256, 5))
    y = rng.standard_normal((256, 1)).astype("float32")

    def summed(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_true - y_pred)) * 1e19

    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(30, 8),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.RMSprop(1e-3), summed)
    _fit(model, tokens, y, logdir, callbacks)


# ------------------------------------------------------------------- reduced_precision_underflow


@case(
    "reduced_precision_underflow",
    "pure float16 (set_dtype_policy float16) Adam, epsilon 1e-8 (0 in float16): v underflows",
)
def fp16_adam_underflow(logdir, callbacks):
    keras, np, tf, _ = _tf()
    keras.config.set_dtype_policy("float16")
    try:
        rng, x, y = _standard(np, seed=38)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
        )
        model.compile(keras.optimizers.Adam(1e-3, epsilon=1e-8), "mse")
        _fit(model, x, y * 1e-4, logdir, callbacks, epochs=4)
    finally:
        keras.config.set_dtype_policy("float32")


# ------------------------------------------------------------------------------------------ healthy


@case(None, "MLP classifier on standardised features, Adam")
def healthy_mlp(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=40, d=10)
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "small CNN on 12x12 images scaled to [0, 1]")
def healthy_cnn(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(41)
    y = rng.integers(0, 2, 256)
    x = rng.uniform(0, 1, (256, 12, 12, 1)).astype("float32")
    x[y == 1, 3:9, 3:9] += 0.5
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "LSTM sequence regression")
def healthy_lstm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(42)
    x = rng.standard_normal((256, 10, 3)).astype("float32")
    y = x[:, :, 0].mean(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((10, 3)), keras.layers.LSTM(16), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "Embedding + average pooling text classifier")
def healthy_embedding(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(43)
    tokens = rng.integers(1, 100, (512, 12))
    y = (np.isin(tokens, np.arange(1, 20)).sum(axis=1) > 2).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            keras.layers.Embedding(100, 16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    return _fit(model, tokens, y, logdir, callbacks, epochs=4)


@case(None, "mixed_float16 MLP with a float32 head")
def healthy_mixed_precision(logdir, callbacks):
    keras, np, tf, _ = _tf()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng, x, _ = _standard(np, seed=44, d=16)
        y = (x[:, :2].sum(axis=1) > 0).astype("int32")
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return _fit(model, x, y, logdir, callbacks, epochs=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@case(None, "tf.data pipeline standardising raw features in a map")
def healthy_pipeline(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(45)
    raw = rng.normal(500.0, 80.0, (512, 6)).astype("float32")
    y = ((raw[:, 0] - 500) / 80 * 2 + 1).astype("float32")
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    ds = tf.data.Dataset.from_tensor_slices((raw, y)).map(lambda r, t: ((r - mean) / std, t))
    ds = ds.shuffle(512, seed=1).batch(32)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    return _fit(model, ds, None, logdir, callbacks, epochs=4)


@case(None, "custom layer with add_weight and a guarded log (log(x + 1e-3))")
def healthy_custom_layer(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class LogScale(keras.layers.Layer):
        def build(self, shape):
            self.scale = self.add_weight(shape=(shape[-1],), initializer="ones", name="scale")

        def call(self, x):
            return self.scale * tf.math.log(x + 1e-3)

    rng, x, y = _standard(np, seed=46)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            LogScale(),
            keras.layers.Dense(1),
        ]
    )
    model.compile("adam", "mse")
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "GRU classifier with RMSprop")
def healthy_gru(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(47)
    x = rng.standard_normal((256, 8, 4)).astype("float32")
    y = (x[:, :, 1].sum(axis=1) > 0).astype("int32")
    model = keras.Sequential([keras.Input((8, 4)), keras.layers.GRU(12), keras.layers.Dense(2)])
    model.compile("rmsprop", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "raw large-scale features through an adapted Normalization layer, SGD")
def healthy_normalization(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(48)
    x = (rng.standard_normal((512, 4)) * [1e6, 3e2, 5.0, 1e-3] + [2e9, 1e3, 0, 0]).astype("float32")
    y = ((x[:, 1] - 1e3) / 3e2).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential(
        [keras.Input((4,)), norm, keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "BatchNormalization + Dropout MLP, SGD with momentum")
def healthy_batchnorm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=49, d=12)
    y = rng.integers(0, 3, 512)
    x[np.arange(512), y] += 2.0
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return _fit(model, x, y, logdir, callbacks, epochs=4)


# --------------------------------------------------- added after the first run (same rules apply)


@case(None, "CNN on raw 0..255 pixel values (not rescaled), Adam")
def healthy_raw_pixels(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(50)
    y = rng.integers(0, 2, 256)
    x = rng.uniform(0, 160, (256, 12, 12, 1)).astype("float32")
    x[y == 1, 2:10, 2:10] += 90.0
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(True))
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case("domain_error", "custom angle layer tf.acos of a linear Dense output (outside [-1, 1])")
def domain_acos(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Angle(keras.layers.Layer):
        def call(self, x):
            return tf.acos(x)

    rng, x, y = _standard(np, seed=51)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), Angle(), keras.layers.Dense(1)]
    )
    model.compile("adam", "mse")
    _fit(model, x, y, logdir, callbacks)


@case(None, "MultiHeadAttention block with LayerNormalization under mixed_float16")
def healthy_attention_mixed(logdir, callbacks):
    keras, np, tf, _ = _tf()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.default_rng(52)
        x = rng.standard_normal((256, 10, 16)).astype("float32")
        y = (x[:, :, 0].mean(axis=1) > 0).astype("int32")
        inp = keras.Input((10, 16))
        h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(inp, inp)
        h = keras.layers.LayerNormalization()(h + inp)
        h = keras.layers.GlobalAveragePooling1D()(h)
        out = keras.layers.Dense(2, dtype="float32")(h)
        model = keras.Model(inp, out)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return _fit(model, x, y, logdir, callbacks, epochs=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@case("nonfinite_target", "class_weight from a 'balanced' formula with a class absent (0/0)")
def target_class_weight_nan(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=53)
    y = rng.integers(0, 2, 512)  # 3 classes declared, class 2 never occurs
    counts = np.bincount(y, minlength=3).astype("float32")
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = counts.sum() / (3 * counts) * (counts > 0) * 1.0  # Inf * 0 = NaN for class 2
    class_weight = {i: float(w) for i, w in enumerate(balanced)}
    y[300] = 2  # one late example of the missing class
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, x, y, logdir, callbacks, class_weight=class_weight, shuffle=False)


@case(None, "regression with outlier targets (up to 50) and a Huber loss")
def healthy_huber(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=54)
    y[rng.integers(0, 512, 20)] = 50.0
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile("adam", keras.losses.Huber())
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case("reduced_precision_overflow", "mixed_float16 logits divided by a temperature of 1e-5")
def fp16_temperature(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Temperature(keras.layers.Layer):
        def call(self, x):
            return x / 1e-5

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng, x, _ = _standard(np, seed=55, d=16)
        y = rng.integers(0, 4, 512)
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(4),
                Temperature(),
                keras.layers.Activation("softmax", dtype="float32"),
            ]
        )
        model.compile("adam", "sparse_categorical_crossentropy")
        _fit(model, x, y, logdir, callbacks)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@case(None, "imbalanced binary classification with class_weight, Adam")
def healthy_class_weight(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, _ = _standard(np, seed=56)
    y = (x[:, 0] > 1.0).astype("int32")
    counts = np.bincount(y, minlength=2)
    class_weight = {i: float(len(y) / (2 * c)) for i, c in enumerate(counts)}
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, "sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    return _fit(model, x, y, logdir, callbacks, epochs=4, class_weight=class_weight)


@case(None, "8 Dense + BatchNormalization layers, SGD 0.1 with momentum")
def healthy_deep_bn(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, seed=57, d=16)
    layers = [keras.Input((16,))]
    for _ in range(8):
        layers += [
            keras.layers.Dense(32),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
        ]
    layers += [keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    return _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "masked Embedding (mask_zero) + LSTM with dropout on padded sequences")
def healthy_masked_lstm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(58)
    tokens = rng.integers(1, 60, (384, 15))
    lengths = rng.integers(4, 16, 384)
    tokens[np.arange(15)[None, :] >= lengths[:, None]] = 0
    y = (np.where(tokens > 0, tokens, 0).sum(axis=1) / np.maximum(lengths, 1) > 30).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((15,), dtype="int32"),
            keras.layers.Embedding(60, 16, mask_zero=True),
            keras.layers.LSTM(16, dropout=0.1),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    return _fit(model, tokens, y, logdir, callbacks, epochs=4)
