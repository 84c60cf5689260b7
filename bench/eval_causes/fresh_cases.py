"""A fresh, held-out batch of blow-ups and healthy runs for the cause evaluation.

Written from the cause table (docs/causes.md) and the descriptions of two new causes
(`optimizer_zero_division`, `recurrent_explosion`) by someone who has not read the rules, after
cases.py and apart from it: other architectures, data, losses, optimizers and layer types.  It is
meant to be scored once, after the rules were tuned on cases.py.

Same form as cases.py: each case is `fn(logdir, callbacks)`, a small real Keras 3 training with
`tb_nanwatch.NanWatchCallback(logdir)` plus the given callbacks; `cause` is what the case was built
to do (None for a healthy run).  The causes are interleaved in `CASES`.  Nothing heavy is imported
at import time.  `check_counter.py` checks each case against the independent batch counter only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import _fit, _standard, _tf, registry  # noqa: E402
from cases import policy as _policy

CASES = []


case = registry(CASES)


# 1 -------------------------------------------------------------------------------------------


@case("nonfinite_input", "Conv2D classifier, images scaled by their own max: a blank frame is 0/0")
def input_blank_frame(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(101)
    frames = rng.integers(0, 256, (320, 16, 16, 1)).astype("float32")
    y = (frames[:, :8].mean(axis=(1, 2, 3)) > frames[:, 8:].mean(axis=(1, 2, 3))).astype("int32")
    frames[150] = 0.0  # the camera dropped a frame: all black
    with np.errstate(invalid="ignore"):
        x = frames / frames.max(axis=(1, 2, 3), keepdims=True)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case(
    None,
    "small Transformer encoder text classifier, AdamW warming up over 12 steps, then decaying towards 0 (CosineDecay)",
)
def healthy_transformer(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(102)
    tokens = rng.integers(1, 100, (384, 20)).astype("int32")
    y = ((tokens < 30).sum(axis=1) > 6).astype("int32")

    class PositionalEmbedding(keras.layers.Layer):
        def __init__(self, length, vocab, dim, **kw):
            super().__init__(**kw)
            self.tokens = keras.layers.Embedding(vocab, dim)
            self.positions = keras.layers.Embedding(length, dim)
            self.length = length

        def call(self, x):
            return self.tokens(x) + self.positions(tf.range(self.length))

    inp = keras.Input((20,), dtype="int32")
    h = PositionalEmbedding(20, 100, 32)(inp)
    a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(h, h)
    h = keras.layers.LayerNormalization()(h + a)
    f = keras.layers.Dense(64, activation="gelu")(h)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(32)(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    schedule = keras.optimizers.schedules.CosineDecay(
        1e-4, decay_steps=60, warmup_target=3e-3, warmup_steps=12
    )
    model.compile(keras.optimizers.AdamW(schedule, weight_decay=1e-2), "binary_crossentropy")
    _fit(model, tokens, y, logdir, callbacks, epochs=5)


@case("optimizer_zero_division", "Embedding bag-of-words, Adam(epsilon=0): unused vocabulary rows")
def zero_div_adam_unused_rows(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(103)
    # a vocabulary of 500 built on a larger corpus; this training set only uses the first 300 ids
    tokens = rng.integers(0, 300, (320, 12)).astype("int32")
    y = (tokens.mean(axis=1) > 150).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            keras.layers.Embedding(500, 16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3, epsilon=0.0), "binary_crossentropy")
    _fit(model, tokens, y, logdir, callbacks)


@case("unscaled_targets", "subclassed Conv2D model predicting energy use in Wh (~1e10), SGD")
def targets_energy_wh(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(104)
    tiles = rng.uniform(0, 1, (256, 12, 12, 2)).astype("float32")  # land-use fractions
    y = (tiles[..., 0].sum(axis=(1, 2)) * 1.5e8)[:, None].astype("float32")  # Wh per year

    class TileRegressor(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(8, 3, activation="leaky_relu")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

    model = TileRegressor()
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, tiles, y, logdir, callbacks)


@case("domain_error", "GeM pooling (mean(x^p))^(1/p) on a linear Conv2D, no clamp: NaN root")
def domain_gem_pooling(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(105)
    x = rng.uniform(0, 1, (256, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 4, 256).astype("int32")

    class GeMPooling(keras.layers.Layer):
        """Generalised-mean pooling from image retrieval, written without clamping x to eps."""

        def __init__(self, p=3.0, **kw):
            super().__init__(**kw)
            self.p = p

        def call(self, x):
            return tf.pow(tf.reduce_mean(tf.pow(x, self.p), axis=[1, 2]), 1.0 / self.p)

    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(16, 3),  # linear: negative features reach the pooling
            GeMPooling(),
            keras.layers.Dense(4),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, x, y, logdir, callbacks)


@case("learning_rate_too_high", "functional two-input regression, SGD learning_rate=0.5")
def lr_two_input_sgd(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(106)
    a = rng.standard_normal((384, 32)).astype("float32")
    b = rng.standard_normal((384, 8)).astype("float32")
    y = (a[:, :4].sum(axis=1, keepdims=True) - b[:, :2].sum(axis=1, keepdims=True)) * 0.5
    ia, ib = keras.Input((32,), name="sensor"), keras.Input((8,), name="context")
    h = keras.layers.Concatenate()([keras.layers.Dense(16)(ia), keras.layers.Dense(8)(ib)])
    out = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(h))
    model = keras.Model([ia, ib], out)
    model.compile(keras.optimizers.SGD(0.5), "mse")
    _fit(model, [a, b], y.astype("float32"), logdir, callbacks)


@case(
    "recurrent_explosion",
    "IRNN: ReLU SimpleRNN, identity recurrent init, 1200 steps, MAE, Adam 3e-2",
)
def recurrent_irnn_rainfall(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(107)
    rain = rng.exponential(0.3, (128, 1200, 1)).astype("float32")  # hourly rainfall, >= 0
    y = (rain.sum(axis=(1, 2)) / 36.0)[:, None].astype("float32")  # river level, ~10
    model = keras.Sequential(
        [
            keras.Input((1200, 1)),
            # Le et al.'s IRNN: identity recurrent kernel (gain 1), ReLU, zero bias
            keras.layers.SimpleRNN(16, activation="relu", recurrent_initializer="identity"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-2), "mae")
    _fit(model, rain, y, logdir, callbacks, epochs=2)


@case("nonfinite_target", "GRU forecaster of year-over-year growth: a store with last year 0 sales")
def target_growth_ratio(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(108)
    weeks = rng.standard_normal((320, 20, 3)).astype("float32")  # standardised weekly signals
    last_year = rng.uniform(50, 150, 320)
    this_year = last_year * (1 + 0.1 * weeks[:, -4:, 0].mean(axis=1))
    last_year[170] = 0.0  # a store that opened this year
    with np.errstate(divide="ignore"):
        y = (this_year / last_year - 1.0)[:, None].astype("float32")
    model = keras.Sequential([keras.Input((20, 3)), keras.layers.GRU(16), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    _fit(model, weeks, y, logdir, callbacks, shuffle=False)


@case(
    "reduced_precision_overflow",
    "mixed_float16 SDF MLP with a hand-written softplus(beta=100) = log(1 + exp(100 x)) / 100",
)
def fp16_softplus_beta(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class SoftplusBeta(keras.layers.Layer):
        def __init__(self, beta=100.0, **kw):
            super().__init__(**kw)
            self.beta = beta

        def call(self, x):
            return tf.math.log(1.0 + tf.exp(self.beta * x)) / self.beta

    with _policy("mixed_float16"):
        rng = np.random.default_rng(109)
        pts = rng.uniform(-0.25, 0.25, (384, 3)).astype("float32")  # a unit scene scaled down
        sdf = (np.linalg.norm(pts, axis=1, keepdims=True) - 0.15).astype("float32")  # a sphere
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(64),
                SoftplusBeta(),
                keras.layers.Dense(64),
                SoftplusBeta(),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-3), "mae")
        _fit(model, pts, sdf, logdir, callbacks)


@case(None, "16-bit sensor images (0..65535) through a Rescaling(1/65535) layer, Conv2D, Adam")
def healthy_rescaled_counts(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(110)
    x = rng.integers(0, 65536, (256, 12, 12, 1)).astype("float32")
    y = (x[:, :6].mean(axis=(1, 2, 3)) / 65535.0 - 0.5)[:, None].astype("float32") * 4
    model = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Rescaling(1.0 / 65535),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case("large_initial_weights", "leaky-ReLU MLP whose Dense layers use kernel_initializer='ones'")
def init_ones_kernels(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=320, d=64, seed=111)
    layers = [keras.Input((64,))]
    for _ in range(4):
        layers.append(keras.layers.Dense(128, activation="leaky_relu", kernel_initializer="ones"))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unstable_loss", "hand-written Gaussian NLL, variance from a ReLU head (log 0 and / 0)")
def loss_gaussian_nll_relu_var(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=384, d=6, seed=112)
    y = (y + rng.standard_normal(y.shape) * np.abs(x[:, :1])).astype("float32")

    def gaussian_nll(y_true, pred):
        mean, var = pred[:, :1], pred[:, 1:]
        return tf.reduce_mean(tf.math.log(var) + tf.square(y_true - mean) / var)

    inp = keras.Input((6,))
    h = keras.layers.Dense(32, activation="relu")(inp)
    mean = keras.layers.Dense(1)(h)
    var = keras.layers.Dense(1, activation="relu")(h)  # meant to be softplus + eps
    model = keras.Model(inp, keras.layers.Concatenate()([mean, var]))
    model.compile("adam", gaussian_nll)
    _fit(model, x, y, logdir, callbacks)


@case("exploding_gradients", "40-layer tanh MLP at 2.5x Glorot (chaotic regime), SGD 0.05")
def grad_deep_tanh_chaotic(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=256, d=32, seed=113)
    layers = [keras.Input((32,))]
    for i in range(40):
        # 2.5 / sqrt(fan_in): 1.8x the He scale, but past the edge of chaos for tanh, where
        # the gradient grows by ~1.2x per layer backward (forward, tanh keeps it bounded)
        init = keras.initializers.RandomNormal(stddev=2.5 / np.sqrt(32), seed=i)
        layers.append(keras.layers.Dense(32, activation="tanh", kernel_initializer=init))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=12)


@case("optimizer_state_overflow", "Nadam, inverse-variance sample weights with sigma ~1e-11 rows")
def slot_nadam_inverse_variance(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=320, d=8, seed=114)
    sigma = rng.uniform(0.5, 2.0, 320)
    sigma[::40] = 1e-11  # reference instruments whose variance is quoted as ~0
    weights = (1.0 / sigma**2).astype("float32")  # up to 1e22
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Nadam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks, sample_weight=weights)


@case(None, "mixed_float16 MLP with a too-large initial loss scale: a few skipped steps, then fine")
def healthy_fp16_skips(logdir, callbacks):
    keras, np, tf, _ = _tf()
    with _policy("mixed_float16"):
        rng, x, y = _standard(np, n=384, d=16, seed=115)
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(3e-3), initial_scale=2**18)
        model.compile(opt, "mse")
        _fit(model, x, y, logdir, callbacks, epochs=4)


@case("unscaled_inputs", "Conv1D regression on raw int32 PCM audio (~1e9), SGD")
def inputs_raw_pcm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(116)
    t = np.arange(256)
    freq = rng.uniform(0.01, 0.2, (192, 1))
    amp = rng.uniform(0.2, 0.9, (192, 1))
    wave = (amp * np.sin(2 * np.pi * freq * t) * 2**31).astype("float32")[..., None]
    y = ((freq - 0.1) * 20).astype("float32")  # standardised pitch
    model = keras.Sequential(
        [
            keras.Input((256, 1)),
            keras.layers.Conv1D(8, 9, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, wave, y, logdir, callbacks)


@case("recurrent_explosion", "ReLU SimpleRNN, identity recurrent init x1.25 over 450 steps")
def recurrent_identity_gain(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(117)
    x = rng.standard_normal((160, 450, 3)).astype("float32")  # standardised sensor traces
    y = x[:, -50:, :1].mean(axis=1) * 5  # the recent level of the first channel
    model = keras.Sequential(
        [
            keras.Input((450, 3)),
            keras.layers.SimpleRNN(
                16,
                activation="relu",
                # "a little above identity to remember longer"
                recurrent_initializer=keras.initializers.Identity(gain=1.25),
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.RMSprop(1e-3), "mse")
    _fit(model, x, y.astype("float32"), logdir, callbacks, epochs=2)


@case("domain_error", "hand-written LayerNorm (x - mean) / sqrt(var) on padded Conv1D features")
def domain_layernorm_no_eps(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(118)
    lengths = rng.integers(10, 41, 256)
    x = rng.standard_normal((256, 40, 4)).astype("float32")
    x[np.arange(40)[None, :] >= lengths[:, None]] = 0.0  # zero padding after each sequence
    y = (x[:, :, 0].sum(axis=1) > 0).astype("int32")

    class SimpleLayerNorm(keras.layers.Layer):
        def call(self, x):
            mean = tf.reduce_mean(x, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
            return (x - mean) / tf.sqrt(var)  # no epsilon

    model = keras.Sequential(
        [
            keras.Input((40, 4)),
            keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
            SimpleLayerNorm(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks)


@case(None, "ReLU MLP with some dead units (Adam 3e-2), loss still falls")
def healthy_dead_relu(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=384, d=10, seed=119)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(
                64,
                activation="relu",
                bias_initializer=keras.initializers.RandomNormal(-1.0, 1.0, seed=3),
            ),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-2), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case("nonfinite_input", "functional numeric + categorical model via tf.data; an empty cell is NaN")
def input_missing_cell(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(120)
    num = rng.standard_normal((448, 5)).astype("float32")
    cat = rng.integers(0, 12, 448).astype("int32")
    y = (num[:, :1] * 0.5 + (cat[:, None] % 3) - 1.0).astype("float32")
    num[300, 3] = np.nan  # an empty CSV cell parsed as NaN
    ds = tf.data.Dataset.from_tensor_slices(({"num": num, "cat": cat}, y)).batch(32)
    num_in = keras.Input((5,), name="num")
    cat_in = keras.Input((), dtype="int32", name="cat")
    h = keras.layers.Concatenate()([num_in, keras.layers.Embedding(12, 4)(cat_in)])
    out = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(h))
    model = keras.Model({"num": num_in, "cat": cat_in}, out)
    model.compile("rmsprop", "mse")
    _fit(model, ds, None, logdir, callbacks)


@case(
    "optimizer_zero_division",
    "one-hot features with a category absent from training, RMSprop(epsilon=0)",
)
def zero_div_rmsprop_absent_category(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(121)
    region = rng.choice([0, 1, 2, 4, 5], 320)  # region 3 never occurs in this training set
    onehot = np.eye(6, dtype="float32")[region]
    num = rng.standard_normal((320, 4)).astype("float32")
    x = np.concatenate([num, onehot], axis=1)
    y = (num[:, :1] + 0.3 * region[:, None] - 0.8).astype("float32")
    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.RMSprop(1e-3, epsilon=0.0), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("large_initial_weights", "three Conv1D layers initialised with stddev 3 (He ~0.1), SGD")
def init_conv1d_stddev(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(122)
    x = rng.standard_normal((256, 64, 4)).astype("float32")
    y = x[:, :, 0].mean(axis=1, keepdims=True) * 4
    layers = [keras.Input((64, 4))]
    for i, ch in enumerate((32, 32, 32)):
        init = keras.initializers.RandomNormal(stddev=3.0, seed=i)
        layers.append(keras.layers.Conv1D(ch, 5, activation="relu", kernel_initializer=init))
    layers += [keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, x, y.astype("float32"), logdir, callbacks)


@case(
    "unstable_loss", "hand-written cosine-distance loss on ReLU outputs (an all-zero output: 0/0)"
)
def loss_cosine_relu(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(123)
    x = rng.standard_normal((320, 12)).astype("float32")
    topics = np.abs(x[:, :4] @ rng.standard_normal((4, 4))).astype("float32") + 0.1

    def cosine_distance(y_true, y_pred):
        dot = tf.reduce_sum(y_true * y_pred, axis=-1)
        return 1.0 - dot / (tf.norm(y_true, axis=-1) * tf.norm(y_pred, axis=-1))

    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4, activation="relu"),  # topic weights are >= 0
        ]
    )
    model.compile("adam", cosine_distance)
    _fit(model, x, topics, logdir, callbacks)


@case(None, "Conv1D + BatchNorm, SGD momentum with a large peak rate 0.5 and warm-up/cosine")
def healthy_large_lr_schedule(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(124)
    x = rng.standard_normal((384, 48, 3)).astype("float32")
    y = (x[:, 10:20, 0].mean(axis=1) > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((48, 3)),
            keras.layers.Conv1D(16, 5, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Conv1D(16, 5, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        0.01, decay_steps=60, warmup_target=0.5, warmup_steps=12
    )
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9), "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks, epochs=5)


@case("exploding_gradients", "functional 40-layer tanh regressor at 2.5x Glorot, SGD 0.08")
def grad_deep_tanh_functional(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(151)
    x = rng.standard_normal((256, 32)).astype("float32")
    y = (x[:, :4] ** 2).sum(axis=1, keepdims=True) - 4.0  # a centred chi-square target
    inp = keras.Input((32,))
    h = inp
    for i in range(40):
        init = keras.initializers.RandomNormal(stddev=2.5 / np.sqrt(32), seed=300 + i)
        h = keras.layers.Dense(32, activation="tanh", kernel_initializer=init)(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(0.08), "mse")
    _fit(model, x, y.astype("float32"), logdir, callbacks, epochs=6)


@case("unscaled_inputs", "subclassed model on raw network-flow features (bytes ~1e8), momentum SGD")
def inputs_flow_bytes(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(126)
    n = 320
    bytes_ = rng.lognormal(18, 1, n)  # ~6e7 bytes
    packets = bytes_ / rng.uniform(500, 1500, n)
    duration_ms = rng.uniform(1e3, 1e6, n)
    x = np.stack([bytes_, packets, duration_ms], axis=1).astype("float32")
    y = (np.log(bytes_ / duration_ms) - 10.0)[:, None].astype("float32")  # a standardised score

    class FlowScorer(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

    model = FlowScorer()
    model.compile(keras.optimizers.SGD(1e-3, momentum=0.9), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("nonfinite_target", "Conv1D multi-label with soft labels votes / total; a clip with 0 votes")
def target_soft_label_votes(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(127)
    x = rng.standard_normal((288, 40, 2)).astype("float32")
    votes = rng.integers(0, 5, (288, 3)).astype("float32")
    votes[200] = 0.0  # nobody annotated this clip
    with np.errstate(invalid="ignore"):
        y = (votes / votes.sum(axis=1, keepdims=True)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((40, 2)),
            keras.layers.Conv1D(8, 5, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(3, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case(
    "reduced_precision_overflow",
    "mixed_float16 log-sum-exp pooling (sharpness 10) over Conv1D features, exp in float16",
)
def fp16_lse_pooling(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class LogSumExpPooling(keras.layers.Layer):
        def __init__(self, r=10.0, **kw):
            super().__init__(**kw)
            self.r = r

        def call(self, x):
            return tf.math.log(tf.reduce_mean(tf.exp(self.r * x), axis=1)) / self.r

    with _policy("mixed_float16"):
        rng = np.random.default_rng(128)
        x = rng.standard_normal((256, 64, 2)).astype("float32")
        y = (x[:, :, 0].max(axis=1) > 2.2).astype("int32")
        model = keras.Sequential(
            [
                keras.Input((64, 2)),
                keras.layers.Conv1D(16, 5, activation="relu"),
                LogSumExpPooling(),
                keras.layers.Dense(1, activation="sigmoid", dtype="float32"),
            ]
        )
        model.compile("adam", "binary_crossentropy")
        _fit(model, x, y, logdir, callbacks)


@case(None, "hand-written Gaussian NLL with a softplus + 1e-6 variance head, Adam")
def healthy_gaussian_nll_eps(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=384, d=6, seed=129)
    y = (y + rng.standard_normal(y.shape) * np.abs(x[:, :1])).astype("float32")

    def gaussian_nll(y_true, pred):
        mean, var = pred[:, :1], pred[:, 1:]
        return tf.reduce_mean(tf.math.log(var) + tf.square(y_true - mean) / var)

    inp = keras.Input((6,))
    h = keras.layers.Dense(32, activation="relu")(inp)
    mean = keras.layers.Dense(1)(h)
    var = keras.layers.Lambda(lambda v: tf.nn.softplus(v) + 1e-6)(keras.layers.Dense(1)(h))
    model = keras.Model(inp, keras.layers.Concatenate()([mean, var]))
    model.compile("adam", gaussian_nll)
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case("learning_rate_too_high", "Conv1D, a custom warm-up schedule to peak 3.0 (meant 3e-3), SGD")
def lr_warmup_typo(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(130)
    x = rng.standard_normal((320, 32, 4)).astype("float32")
    y = x[:, :, :2].mean(axis=(1, 2))[:, None].astype("float32") * 3

    class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak, steps):
            self.peak, self.steps = peak, steps

        def __call__(self, step):
            return self.peak * tf.minimum(1.0, tf.cast(step + 1, "float32") / self.steps)

    model = keras.Sequential(
        [
            keras.Input((32, 4)),
            keras.layers.Conv1D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(LinearWarmup(3.0, 20)), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(
    "optimizer_state_overflow",
    "custom train_step scaling the loss by 2**70 (manual loss scaling) without unscaling, Adam",
)
def slot_manual_loss_scale(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng, x, y = _standard(np, n=320, d=8, seed=131)

    class ScaledModel(keras.Model):
        scale = 2.0**70

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=pred)
                scaled = loss * self.scale
            grads = tape.gradient(scaled, self.trainable_variables)  # forgot: / self.scale
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            for m in self.metrics:
                if m.name == "loss":
                    m.update_state(loss)
            return {m.name: m.result() for m in self.metrics}

    inp = keras.Input((8,))
    out = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(inp))
    model = ScaledModel(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unscaled_targets", "LSTM revenue forecaster with targets in cents (~5e10), momentum SGD")
def targets_revenue_cents(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(132)
    x = rng.standard_normal((256, 24, 3)).astype("float32")
    y = (5e10 + 1e10 * x[:, -6:, 0].mean(axis=1))[:, None].astype("float32")
    model = keras.Sequential(
        [
            keras.Input((24, 3)),
            keras.layers.LSTM(16),
            keras.layers.Dense(16, activation="selu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-2, momentum=0.9), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(None, "Embedding model with unused vocabulary rows, Adam at its default epsilon")
def healthy_unused_rows_default_eps(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(133)
    tokens = rng.integers(0, 300, (320, 12)).astype("int32")
    y = (tokens.mean(axis=1) > 150).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            keras.layers.Embedding(500, 16),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    _fit(model, tokens, y, logdir, callbacks, epochs=4)


@case(None, "GRU over 200 steps with global_clipnorm=1.0, Nadam")
def healthy_long_gru_clipped(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(134)
    x = rng.standard_normal((160, 200, 2)).astype("float32")
    y = x[:, -20:, 0].mean(axis=1, keepdims=True) * 3
    model = keras.Sequential([keras.Input((200, 2)), keras.layers.GRU(16), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Nadam(3e-3, global_clipnorm=1.0), "mse")
    _fit(model, x, y.astype("float32"), logdir, callbacks, epochs=4)


@case(None, "two-input functional classifier (image + metadata) with class_weight, mixed_float16")
def healthy_multi_input_fp16(logdir, callbacks):
    keras, np, tf, _ = _tf()
    with _policy("mixed_float16"):
        rng = np.random.default_rng(135)
        img = rng.uniform(0, 1, (320, 10, 10, 1)).astype("float32")
        meta = rng.standard_normal((320, 3)).astype("float32")
        y = ((img[:, :5].mean(axis=(1, 2, 3)) - 0.5) * 10 + meta[:, 0] > 1.0).astype("int32")
        counts = np.bincount(y, minlength=2)
        class_weight = {i: float(len(y) / (2 * c)) for i, c in enumerate(counts)}
        i_img, i_meta = keras.Input((10, 10, 1)), keras.Input((3,))
        h = keras.layers.Conv2D(8, 3, activation="relu")(i_img)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(i_meta)])
        out = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(h)
        model = keras.Model([i_img, i_meta], out)
        model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
        _fit(model, [img, meta], y, logdir, callbacks, epochs=4, class_weight=class_weight)
