"""A second fresh, held-out batch of blow-ups and healthy runs for the cause evaluation.

Written from the cause sections of docs/causes.md by someone who has not read the rules, apart
from cases.py and fresh_cases.py: other architectures (ResNet-ish CNNs with BatchNorm, encoder-
decoders, VAEs, siamese/contrastive models, residual stacks, custom RNN cells, Bidirectional
layers, tabular models with StringLookup/Normalization), other optimizers (Adamax, Adagrad, Lion,
Ftrl, AdamW, Nesterov SGD) and pipelines.  Meant to be scored once.

Same form as cases.py: each case is `fn(logdir, callbacks)`, a small real Keras 3 training with
`tb_nanwatch.NanWatchCallback(logdir)` plus the given callbacks; `cause` is what the case was built
to do (None for a healthy run).  Nothing heavy is imported at import time.

`UNDO = True` makes every blow-up build its counterfactual instead: the same training with the one
thing its cause names undone (`counterfactuals.py --suite fresh2` runs them; the scored batch never does).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cases import _fit, _tf, registry  # noqa: E402
from cases import policy as _policy

CASES = []

# the counterfactual switch (see the module docstring); False for the scored batch
UNDO = False


case = registry(CASES)


# 1 -------------------------------------------------------------------------------------------


@case(
    "nonfinite_input",
    "Conv1D on log-power audio frames made in a tf.data map: a silent clip is log(0)",
)
def input_silent_clip_logpower(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(201)
    clips = (rng.standard_normal((320, 256)) * rng.uniform(0.1, 1.0, (320, 1))).astype("float32")
    y = (np.abs(clips[:, :128]).mean(axis=1) > np.abs(clips[:, 128:]).mean(axis=1)).astype("int32")
    clips[90] = 0.0  # a silent recording
    floor = 1e-6 if UNDO else 0.0

    def frames(clip, label):
        power = tf.square(tf.reshape(clip, (32, 8)))  # 32 frames of 8 samples
        return tf.math.log(power + floor), label

    ds = tf.data.Dataset.from_tensor_slices((clips, y)).map(frames).batch(32)
    model = keras.Sequential(
        [
            keras.Input((32, 8)),
            keras.layers.Conv1D(16, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adamax(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, ds, None, logdir, callbacks, batch_size=None)


@case(None, "small ResNet (Conv2D + BatchNorm + skip connections) on 16x16 RGB, Nesterov SGD 0.05")
def healthy_resnet_batchnorm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(202)
    x = rng.uniform(0, 1, (320, 16, 16, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype("int32")

    def block(h, filters):
        r = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        r = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(r))
        r = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(r)
        r = keras.layers.BatchNormalization()(r)
        return keras.layers.Activation("relu")(keras.layers.Add()([h, r]))

    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = block(block(h, 16), 16)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(
    "optimizer_zero_division",
    "RGBA images whose alpha channel is always 0, Conv2D, Adamax(epsilon=0)",
)
def zero_div_adamax_alpha_channel(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(203)
    rgb = rng.uniform(0, 1, (256, 12, 12, 3)).astype("float32")
    alpha = np.zeros((256, 12, 12, 1), "float32")  # exported with an empty alpha channel
    x = np.concatenate([rgb, alpha], axis=-1)
    y = (rgb[..., 1].mean(axis=(1, 2)) > 0.5).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((12, 12, 4)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        keras.optimizers.Adamax(2e-3, epsilon=1e-7 if UNDO else 0.0), "binary_crossentropy"
    )
    _fit(model, x, y, logdir, callbacks)


@case(
    "unscaled_targets",
    "Bidirectional GRU + ReLU Dense forecasting city population counts (~1e9), SGD 1e-2",
)
def targets_population_counts(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(204)
    x = rng.standard_normal((256, 15, 4)).astype("float32")  # standardised yearly indicators
    y = (1.2e9 * (1 + 0.1 * x[:, -3:, 0].mean(axis=1)))[:, None].astype("float32")
    if UNDO:
        y = ((y - y.mean()) / y.std()).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((15, 4)),
            keras.layers.Bidirectional(keras.layers.GRU(8)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "domain_error", "VAE encoder: std = sqrt(variance) of a linear Dense head (negative variance)"
)
def domain_vae_sqrt_variance(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(205)
    x = rng.uniform(0, 1, (320, 24)).astype("float32")

    class Reparameterise(keras.layers.Layer):
        def call(self, inputs):
            mean, variance = inputs
            if UNDO:
                variance = tf.nn.softplus(variance)
            eps = tf.random.normal(tf.shape(mean), seed=7)
            return mean + tf.sqrt(variance) * eps

    inp = keras.Input((24,))
    h = keras.layers.Dense(32, activation="relu")(inp)
    z = Reparameterise()([keras.layers.Dense(4)(h), keras.layers.Dense(4)(h)])
    out = keras.layers.Dense(24, activation="sigmoid")(keras.layers.Dense(32, activation="relu")(z))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, x, logdir, callbacks)


@case(
    "learning_rate_too_high",
    "wide & deep tabular (StringLookup + Embedding + Normalization), SGD 2.0",
)
def lr_wide_deep_sgd(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(206)
    num = rng.standard_normal((384, 10)).astype("float32") * 3 + 5
    cities = np.array(["oslo", "lima", "pune", "kobe", "nice"])[rng.integers(0, 5, 384)]
    y = (num[:, :3].sum(axis=1) / 5 + (cities == "lima") - 2)[:, None].astype("float32")
    lookup = keras.layers.StringLookup(vocabulary=["oslo", "lima", "pune", "kobe", "nice"])
    norm = keras.layers.Normalization()
    norm.adapt(num)
    n_in, c_in = keras.Input((10,), name="numeric"), keras.Input((1,), dtype="string", name="city")
    c = keras.layers.Flatten()(keras.layers.Embedding(6, 4)(lookup(c_in)))
    deep = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([norm(n_in), c]))
    out = keras.layers.Add()([keras.layers.Dense(1)(deep), keras.layers.Dense(1)(norm(n_in))])
    model = keras.Model([n_in, c_in], out)
    model.compile(keras.optimizers.SGD(0.2 if UNDO else 2.0), "mse")
    ds = tf.data.Dataset.from_tensor_slices(((num, cities[:, None]), y)).batch(32)
    _fit(model, ds, None, logdir, callbacks, batch_size=None)


@case(
    "recurrent_explosion",
    "custom linear RNN cell (h = W h + U x) in keras.layers.RNN, orthogonal gain 1.1, 600 steps, Lion",
)
def recurrent_linear_cell_lion(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(207)
    x = (rng.standard_normal((128, 600, 2)) * 0.5).astype("float32")
    y = x[:, -20:, 0].mean(axis=1, keepdims=True)

    class LinearCell(keras.layers.Layer):
        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.units = units
            self.state_size = units

        def build(self, input_shape):
            gain = 0.9 if UNDO else 1.1
            self.w = self.add_weight(
                shape=(self.units, self.units),
                initializer=keras.initializers.Orthogonal(gain=gain, seed=3),
                name="recurrent_kernel",
            )
            self.u = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

        def call(self, x, states):
            h = tf.matmul(states[0], self.w) + tf.matmul(x, self.u)
            return h, [h]

    model = keras.Sequential(
        [keras.Input((600, 2)), keras.layers.RNN(LinearCell(16)), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Lion(1e-4), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=2)


@case(
    "nonfinite_target",
    "conv encoder-decoder depth maps normalised by each map's max: an empty map is 0/0",
)
def target_depth_map_normalised(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(208)
    img = rng.uniform(0, 1, (256, 16, 16, 1)).astype("float32")
    depth = (img * rng.uniform(1, 10, (256, 1, 1, 1))).astype("float32")
    depth[75] = 0.0  # a scan where the sensor returned nothing
    peak = depth.max(axis=(1, 2, 3), keepdims=True)
    with np.errstate(invalid="ignore"):
        target = (depth / (np.maximum(peak, 1e-6) if UNDO else peak)).astype("float32")
    inp = keras.Input((16, 16, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2DTranspose(8, 2, strides=2, activation="relu")(h)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, img, target, logdir, callbacks, shuffle=False)


@case(
    "reduced_precision_overflow",
    "mixed_float16 odometry: tf.cumsum of speeds (~15 m/s) over 6000 steps in float16",
)
def fp16_cumsum_odometry(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Integrate(keras.layers.Layer):
        """Distance travelled so far at every step, from the speed channel."""

        def call(self, x):
            return tf.cumsum(x, axis=1) / 1000.0  # km

    with _policy("float32" if UNDO else "mixed_float16"):
        rng = np.random.default_rng(209)
        speed = rng.uniform(10, 20, (96, 6000, 1)).astype("float32")
        y = (speed.sum(axis=(1, 2)) / 1e5)[:, None].astype("float32")
        model = keras.Sequential(
            [
                keras.Input((6000, 1)),
                Integrate(),
                keras.layers.Conv1D(4, 5, strides=5),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1, dtype="float32"),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        _fit(model, speed, y, logdir, callbacks, epochs=2)


@case(None, "VAE (reparameterisation with exp(0.5 log_var), KL via add_loss), Adam")
def healthy_vae_kl(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(210)
    codes = rng.standard_normal((384, 3)).astype("float32")
    x = (1 / (1 + np.exp(-codes @ rng.standard_normal((3, 20))))).astype("float32")

    class Sampling(keras.layers.Layer):
        def call(self, inputs):
            mean, log_var = inputs
            kl = -0.5 * tf.reduce_mean(
                tf.reduce_sum(1 + log_var - tf.square(mean) - tf.exp(log_var), axis=1)
            )
            self.add_loss(1e-2 * kl)
            return mean + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mean), seed=5)

    inp = keras.Input((20,))
    h = keras.layers.Dense(32, activation="relu")(inp)
    z = Sampling()([keras.layers.Dense(3)(h), keras.layers.Dense(3)(h)])
    out = keras.layers.Dense(20, activation="sigmoid")(keras.layers.Dense(32, activation="relu")(z))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
    _fit(model, x, x, logdir, callbacks, epochs=4)


@case(
    "large_initial_weights",
    "Conv2D/Conv2DTranspose autoencoder initialised with stddev 3 (He ~0.12), SGD",
)
def init_conv_autoencoder(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(211)
    x = rng.uniform(0, 1, (256, 16, 16, 1)).astype("float32")

    def init(i):
        if UNDO:
            return keras.initializers.HeNormal(seed=i)
        return keras.initializers.RandomNormal(stddev=3.0, seed=i)

    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(
                16, 3, strides=2, padding="same", activation="relu", kernel_initializer=init(0)
            ),
            keras.layers.Conv2D(
                16, 3, strides=2, padding="same", activation="relu", kernel_initializer=init(1)
            ),
            keras.layers.Conv2DTranspose(
                16, 3, strides=2, padding="same", activation="relu", kernel_initializer=init(2)
            ),
            keras.layers.Conv2DTranspose(
                1, 3, strides=2, padding="same", kernel_initializer=init(3)
            ),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, x, x, logdir, callbacks)


@case("unstable_loss", "hand-written Pearson-correlation loss; a batch of identical targets is 0/0")
def loss_pearson_constant_batch(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(212)
    x = rng.standard_normal((320, 30, 4)).astype("float32")  # standardised assay signals
    y = np.maximum(x[:, :, 0].mean(axis=1) * 3, 0.0)[:, None].astype("float32")
    order = np.argsort(y[:, 0], kind="stable")  # the data came sorted: zero-expression first
    x, y = x[order], y[order]

    def neg_pearson(y_true, y_pred):
        t = y_true - tf.reduce_mean(y_true)
        p = y_pred - tf.reduce_mean(y_pred)
        denom = tf.sqrt(tf.reduce_sum(t * t) * tf.reduce_sum(p * p))
        return -tf.reduce_sum(t * p) / (denom + (1e-6 if UNDO else 0.0))

    model = keras.Sequential([keras.Input((30, 4)), keras.layers.GRU(12), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), neg_pearson)
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case("exploding_gradients", "40-block residual MLP, He-init branches, no normalisation, SGD 1e-3")
def grad_residual_mlp_no_norm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(213)
    x = rng.standard_normal((256, 32)).astype("float32")
    y = (x[:, :4].sum(axis=1, keepdims=True) * 0.5).astype("float32")
    inp = keras.Input((32,))
    h = keras.layers.Dense(32)(inp)
    for i in range(40):
        r = keras.layers.Dense(
            32, activation="relu", kernel_initializer=keras.initializers.HeNormal(seed=2 * i)
        )(h)
        last = "zeros" if UNDO else keras.initializers.HeNormal(seed=2 * i + 1)  # Fixup-style
        r = keras.layers.Dense(32, kernel_initializer=last)(r)
        h = keras.layers.Add()([h, r])
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case("unscaled_inputs", "Conv1D on seismic displacement in nanometres (~1e6), SGD 1e-3")
def inputs_seismic_nanometres(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(214)
    trace = np.cumsum(rng.standard_normal((256, 200, 1)), axis=1).astype("float32")
    y = (np.abs(np.diff(trace[:, -50:, 0], axis=1)).mean(axis=1) > 0.8)[:, None].astype("float32")
    x = trace * 2.5e5  # metres-scale signal recorded in nm
    if UNDO:
        x = (x / np.abs(x).max()).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((200, 1)),
            keras.layers.Conv1D(8, 5, activation="relu"),
            keras.layers.GlobalMaxPooling1D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    None,
    "tabular: raw incomes (~1e6) and counts through adapted Normalization + StringLookup one-hot, Adagrad",
)
def healthy_tabular_normalization_adagrad(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(215)
    income = rng.lognormal(13.5, 0.6, (384, 1)).astype("float32")  # ~1e6
    visits = rng.poisson(40, (384, 1)).astype("float32")
    plan = np.array(["free", "pro", "team"])[rng.integers(0, 3, 384)]
    y = ((np.log(income) > 13.5) ^ (plan == "free")[:, None]).astype("float32")
    num = np.concatenate([income, visits], axis=1)
    norm = keras.layers.Normalization()
    norm.adapt(num)
    lookup = keras.layers.StringLookup(vocabulary=["free", "pro", "team"], output_mode="one_hot")
    n_in, p_in = keras.Input((2,)), keras.Input((1,), dtype="string")
    h = keras.layers.Concatenate()([norm(n_in), lookup(p_in)])
    h = keras.layers.Dense(16, activation="relu")(h)
    model = keras.Model([n_in, p_in], keras.layers.Dense(1, activation="sigmoid")(h))
    model.compile(keras.optimizers.Adagrad(0.1), "binary_crossentropy")
    ds = (
        tf.data.Dataset.from_tensor_slices(((num, plan[:, None]), y)).shuffle(384, seed=1).batch(32)
    )
    _fit(model, ds, None, logdir, callbacks, batch_size=None, epochs=4)


@case(
    "optimizer_state_overflow",
    "Ftrl click model, sample_weight = impressions read in micro-units (~1e21, a unit bug)",
)
def slot_ftrl_impression_weights(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(216)
    x = rng.standard_normal((320, 12)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("float32")
    impressions = rng.uniform(1e3, 1e4, 320)
    weights = (impressions * (1.0 if UNDO else 1e18)).astype("float32")  # should be * 1
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Ftrl(0.05), "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks, sample_weight=weights)


@case("domain_error", "GRU + custom layer taking log1p of a linear Dense output (< -1 is NaN)")
def domain_log1p_linear(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(217)
    x = rng.standard_normal((320, 20, 3)).astype("float32")
    y = x[:, -5:, 1].mean(axis=1, keepdims=True).astype("float32")

    class Log1pCounts(keras.layers.Layer):
        """Meant to compress a learned count, but the count comes from a linear layer."""

        def call(self, h):
            return tf.math.log1p(tf.nn.relu(h) if UNDO else h)

    model = keras.Sequential(
        [
            keras.Input((20, 3)),
            keras.layers.GRU(16),
            keras.layers.Dense(
                16, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=1)
            ),
            Log1pCounts(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "learning_rate_too_high",
    "Dense autoencoder on standardised data, Nesterov SGD with PiecewiseConstantDecay [5.0, 0.5]",
)
def lr_piecewise_autoencoder(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(218)
    codes = rng.standard_normal((384, 4))
    x = (codes @ rng.standard_normal((4, 24))).astype("float32")
    x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    values = [0.05, 0.005] if UNDO else [5.0, 0.5]  # meant [5e-2, 5e-3]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([24], values)
    model = keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(4),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(24),
        ]
    )
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True), "mse")
    _fit(model, x, x, logdir, callbacks)


@case(
    None,
    "siamese MLP, contrastive loss (margin 3) on a guarded distance sqrt(sum(d^2) + 1e-9), some identical pairs, Lion",
)
def healthy_siamese_guarded_sqrt(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(219)
    a = rng.standard_normal((384, 10)).astype("float32")
    same = rng.integers(0, 2, 384)
    noisy = a + 0.3 * rng.standard_normal((384, 10))
    b = np.where(same[:, None] == 1, noisy, rng.standard_normal((384, 10))).astype("float32")
    b[:40] = a[:40]  # some pairs are identical: distance exactly 0
    same[:40] = 1
    y = same.astype("float32")[:, None]
    tower = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)]
    )
    ia, ib = keras.Input((10,)), keras.Input((10,))

    class Distance(keras.layers.Layer):
        def call(self, u, v):
            return tf.sqrt(tf.reduce_sum(tf.square(u - v), axis=1, keepdims=True) + 1e-9)

    model = keras.Model([ia, ib], Distance()(tower(ia), tower(ib)))

    def contrastive(y_true, d):
        return tf.reduce_mean(y_true * tf.square(d) + (1 - y_true) * tf.square(tf.nn.relu(3.0 - d)))

    model.compile(keras.optimizers.Lion(3e-4), contrastive)
    _fit(model, [a, b], y, logdir, callbacks, epochs=4)


@case(
    "nonfinite_input",
    "Bidirectional LSTM on sensor sequences; one sequence starts with NaN (forward fill has nothing before)",
)
def input_forward_fill_leading_nan(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(220)
    x = rng.standard_normal((256, 25, 3)).astype("float32")
    y = x[:, :, 2].mean(axis=1, keepdims=True).astype("float32")
    x[130, :3, 1] = np.nan  # missing readings at the start: forward-fill leaves them NaN
    if UNDO:
        x = np.nan_to_num(x)
    model = keras.Sequential(
        [
            keras.Input((25, 3)),
            keras.layers.Bidirectional(keras.layers.LSTM(8)),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adagrad(0.05), "mse")
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case(
    "unstable_loss",
    "hand-written Poisson NLL rate - y log(rate) on a linear count head (log of a negative rate)",
)
def loss_poisson_linear_rate(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(221)
    x = rng.standard_normal((320, 24, 2)).astype("float32")
    y = rng.poisson(np.exp(0.3 * x[:, -6:, 0].mean(axis=1) + 1.0))[:, None].astype("float32")

    def poisson_nll(y_true, rate):
        if UNDO:
            rate = tf.nn.softplus(rate) + 1e-6
        return tf.reduce_mean(rate - y_true * tf.math.log(rate))

    model = keras.Sequential(
        [
            keras.Input((24, 2)),
            keras.layers.Conv1D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),  # meant to be exp/softplus
        ]
    )
    model.compile(keras.optimizers.Adamax(2e-3), poisson_nll)
    _fit(model, x, y, logdir, callbacks)


@case(
    "large_initial_weights",
    "8-layer ReLU MLP with RandomNormal(stddev=50) kernels (He ~0.18), Adagrad",
)
def init_huge_mlp_adagrad(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(222)
    x = rng.standard_normal((256, 64)).astype("float32")
    y = (x[:, :8].sum(axis=1, keepdims=True) * 0.3).astype("float32")
    layers = [keras.Input((64,))]
    for i in range(8):
        init = (
            keras.initializers.HeNormal(seed=i)
            if UNDO
            else keras.initializers.RandomNormal(stddev=50.0, seed=i)
        )
        layers.append(keras.layers.Dense(64, activation="relu", kernel_initializer=init))
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adagrad(1e-2), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    None,
    "mixed_float16 U-Net-ish segmentation (skip connection, Conv2DTranspose), float32 head, Adam",
)
def healthy_unet_mixed(logdir, callbacks):
    keras, np, tf, _ = _tf()
    with _policy("mixed_float16"):
        rng = np.random.default_rng(223)
        x = rng.uniform(0, 1, (256, 16, 16, 1)).astype("float32")
        mask = (x > 0.6).astype("float32")
        inp = keras.Input((16, 16, 1))
        e = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
        d = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(e)
        u = keras.layers.Conv2DTranspose(8, 2, strides=2)(d)
        h = keras.layers.Concatenate()([e, u])
        out = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(h)
        model = keras.Model(inp, out)
        model.compile(keras.optimizers.Adam(3e-3), "binary_crossentropy")
        _fit(model, x, mask, logdir, callbacks, epochs=4)


@case(
    "reduced_precision_overflow",
    "mixed_float16 style-transfer Gram matrix (sum over 16x16 positions) on 0..255 pixels",
)
def fp16_gram_matrix(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class Gram(keras.layers.Layer):
        """Feature correlations, summed over positions (not divided by their number)."""

        def call(self, f):
            _, h, w, c = f.shape
            flat = tf.reshape(f, (-1, h * w, c))
            return tf.reshape(tf.matmul(flat, flat, transpose_a=True), (-1, c * c))

    with _policy("float32" if UNDO else "mixed_float16"):
        rng = np.random.default_rng(224)
        x = rng.integers(0, 256, (256, 16, 16, 3)).astype("float32")
        y = (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2))).astype("int32")
        model = keras.Sequential(
            [
                keras.Input((16, 16, 3)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                Gram(),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _fit(model, x, y, logdir, callbacks)


@case(
    "exploding_gradients",
    "32-block residual Conv1D stack (He-init branches, no normalisation), momentum SGD 1e-3",
)
def grad_residual_conv1d(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(225)
    x = rng.standard_normal((256, 64, 1)).astype("float32")
    y = (x[:, :32, 0].std(axis=1) > x[:, 32:, 0].std(axis=1))[:, None].astype("float32")
    inp = keras.Input((64, 1))
    h = keras.layers.Conv1D(8, 3, padding="same")(inp)
    for i in range(32):
        r = keras.layers.Conv1D(
            8,
            3,
            padding="same",
            activation="relu",
            kernel_initializer=keras.initializers.HeNormal(seed=2 * i),
        )(h)
        # each He-init branch adds its own variance: gradients double block over block backward
        last = "zeros" if UNDO else keras.initializers.HeNormal(seed=2 * i + 1)
        r = keras.layers.Conv1D(8, 3, padding="same", kernel_initializer=last)(r)
        h = keras.layers.Add()([h, r])
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(1e-3, momentum=0.9), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "optimizer_zero_division",
    "StringLookup one-hot with a category absent from training, Adagrad(epsilon=0, accumulator 0)",
)
def zero_div_adagrad_absent_category(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(226)
    vocab = ["visa", "amex", "paypal", "crypto"]  # 'crypto' launched after this data was taken
    method = np.array(vocab[:3])[rng.integers(0, 3, 320)]
    amount = rng.standard_normal((320, 3)).astype("float32")
    y = ((method == "amex") ^ (amount[:, 0] > 0)).astype("float32")[:, None]
    lookup = keras.layers.StringLookup(vocabulary=vocab, output_mode="one_hot", num_oov_indices=0)
    m_in, a_in = keras.Input((1,), dtype="string"), keras.Input((3,))
    h = keras.layers.Concatenate()([lookup(m_in), a_in])
    h = keras.layers.Dense(8, activation="tanh")(h)
    model = keras.Model([m_in, a_in], keras.layers.Dense(1, activation="sigmoid")(h))
    opt = keras.optimizers.Adagrad(
        5e-2, initial_accumulator_value=0.1 if UNDO else 0.0, epsilon=1e-7 if UNDO else 0.0
    )
    model.compile(opt, "binary_crossentropy")
    ds = tf.data.Dataset.from_tensor_slices(((method[:, None], amount), y)).batch(32)
    _fit(model, ds, None, logdir, callbacks, batch_size=None)


@case(None, "Conv1D audio classifier with a high but stable rate: Adamax 2e-2, ExponentialDecay")
def healthy_conv1d_adamax_high_lr(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(227)
    t = np.linspace(0, 1, 128, dtype="float32")
    freq = rng.integers(0, 2, 320)
    x = np.sin(2 * np.pi * np.where(freq == 1, 12, 5)[:, None] * t) + 0.5 * rng.standard_normal(
        (320, 128)
    )
    x = x[..., None].astype("float32")
    schedule = keras.optimizers.schedules.ExponentialDecay(2e-2, decay_steps=10, decay_rate=0.9)
    model = keras.Sequential(
        [
            keras.Input((128, 1)),
            keras.layers.Conv1D(8, 9, activation="relu"),
            keras.layers.MaxPooling1D(4),
            keras.layers.Conv1D(16, 5, activation="relu"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adamax(schedule),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, x, freq.astype("int32"), logdir, callbacks, epochs=4)


@case(
    "nonfinite_target",
    "siamese pairs labelled by cosine similarity of metadata vectors; an empty profile is 0/0",
)
def target_cosine_label_empty_profile(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(228)
    a = rng.standard_normal((320, 8)).astype("float32")
    b = rng.standard_normal((320, 8)).astype("float32")
    meta_a, meta_b = rng.uniform(0, 1, (320, 5)), rng.uniform(0, 1, (320, 5))
    meta_b[140] = 0.0  # a user who filled in nothing
    norms = np.linalg.norm(meta_a, axis=1) * np.linalg.norm(meta_b, axis=1)
    with np.errstate(invalid="ignore"):
        y = (meta_a * meta_b).sum(axis=1) / (np.maximum(norms, 1e-9) if UNDO else norms)
    y = y[:, None].astype("float32")
    tower = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="gelu"), keras.layers.Dense(8)]
    )
    ia, ib = keras.Input((8,)), keras.Input((8,))
    sim = keras.layers.Dot(axes=1, normalize=True)([tower(ia), tower(ib)])
    model = keras.Model([ia, ib], sim)
    model.compile(keras.optimizers.AdamW(1e-3), "mse")
    _fit(model, [a, b], y, logdir, callbacks, shuffle=False)


@case(
    "unscaled_inputs",
    "tabular regression with raw genomic positions (~1e8) beside standardised features, SGD",
)
def inputs_genomic_positions(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(229)
    feats = rng.standard_normal((384, 6)).astype("float32")
    position = rng.uniform(1e7, 2.4e8, (384, 1)).astype("float32")  # base pairs along chromosome 1
    y = (feats[:, :2].sum(axis=1, keepdims=True) + (position > 1.2e8)).astype("float32")
    if UNDO:
        position = ((position - position.mean()) / position.std()).astype("float32")
    x = np.concatenate([feats, position], axis=1)
    model = keras.Sequential(
        [keras.Input((7,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "recurrent_explosion",
    "ReLU SimpleRNN in a custom train_step, orthogonal recurrent init of gain 1.8 (RMS 1.3x He), 500 steps, AdamW",
)
def recurrent_relu_custom_train_step(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(230)
    x = np.abs(rng.standard_normal((128, 500, 2))).astype("float32")  # rectified sensor energy
    y = x[:, -10:, :].mean(axis=(1, 2))[:, None].astype("float32")

    class Forecaster(keras.Model):
        def __init__(self):
            super().__init__()
            gain = 0.9 if UNDO else 1.8
            self.rnn = keras.layers.SimpleRNN(
                16,
                activation="relu",
                recurrent_initializer=keras.initializers.Orthogonal(gain=gain, seed=4),
            )
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.rnn(x))

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    model = Forecaster()
    model.compile(keras.optimizers.AdamW(1e-3))
    _fit(model, x, y, logdir, callbacks, epochs=2)


@case(
    None,
    "two-output functional model (class + regression) with class_weight-free sample weights, Nadam",
)
def healthy_two_output_sample_weight(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(231)
    x = rng.standard_normal((384, 12)).astype("float32")
    cls = (x[:, 0] - x[:, 1] > 0).astype("int32")
    reg = (x[:, 2:5].sum(axis=1, keepdims=True) * 0.5).astype("float32")
    weight = np.where(cls == 1, 2.0, 1.0).astype("float32")  # the positive class matters more
    inp = keras.Input((12,))
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Dropout(0.1)(inp))
    out_c = keras.layers.Dense(2, name="cls")(h)
    out_r = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(inp, {"cls": out_c, "reg": out_r})
    model.compile(
        keras.optimizers.Nadam(2e-3),
        {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
    )
    _fit(model, x, {"cls": cls, "reg": reg}, logdir, callbacks, epochs=4, sample_weight=weight)


@case("unscaled_targets", "two-output model: class head + sale price in satoshis (~1e11), SGD 1e-3")
def targets_price_satoshis(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(232)
    x = rng.standard_normal((320, 10)).astype("float32")
    price = (3e11 * np.exp(0.2 * x[:, :1])).astype("float32")  # ~3000 BTC lots, in satoshis
    if UNDO:
        price = ((price - price.mean()) / price.std()).astype("float32")
    cls = (x[:, 3] > 0).astype("int32")
    inp = keras.Input((10,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    model = keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(1)(h)])
    model.compile(
        keras.optimizers.SGD(1e-3),
        [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"],
    )
    _fit(model, x, [cls, price], logdir, callbacks)


@case(
    "optimizer_state_overflow",
    "AdamW under a custom train_step that multiplies the likelihood by the dataset size in bytes (2**72)",
)
def slot_adamw_dataset_bytes(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(233)
    x = rng.standard_normal((320, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("float32")[:, None]

    class ScaledLikelihood(keras.Model):
        """ELBO-style: the batch mean likelihood times the number of training examples, but the
        'size' passed in was the dataset's size in bytes."""

        def __init__(self, size):
            super().__init__()
            self.size = size
            self.conv = keras.layers.Conv2D(4, 3, activation="relu")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(1)

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                nll = tf.reduce_mean(
                    tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=self(x, training=True))
                )
                loss = nll * self.size
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": nll}

    model = ScaledLikelihood(320.0 if UNDO else 2.0**72)
    model.compile(keras.optimizers.AdamW(1e-3))
    _fit(model, x, y, logdir, callbacks)


@case(
    None, "12-block pre-LayerNorm residual MLP with GELU, AdamW and warm-up (deep but normalised)"
)
def healthy_deep_prenorm_residual(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(234)
    x = rng.standard_normal((384, 16)).astype("float32")
    y = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype("float32")
    inp = keras.Input((16,))
    h = keras.layers.Dense(32)(inp)
    for _ in range(12):
        r = keras.layers.Dense(64, activation="gelu")(keras.layers.LayerNormalization()(h))
        h = keras.layers.Add()([h, keras.layers.Dense(32)(r)])
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.LayerNormalization()(h)))
    schedule = keras.optimizers.schedules.CosineDecay(1e-4, 60, warmup_target=2e-3, warmup_steps=10)
    model.compile(keras.optimizers.AdamW(schedule), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(None, "mixed_float16 Conv1D audio with an initial loss scale of 2**24: a few skipped steps")
def healthy_fp16_conv1d_skips(logdir, callbacks):
    keras, np, tf, _ = _tf()
    with _policy("mixed_float16"):
        rng = np.random.default_rng(235)
        x = rng.standard_normal((320, 96, 1)).astype("float32")
        y = (np.abs(x[:, :48]).mean(axis=(1, 2)) > np.abs(x[:, 48:]).mean(axis=(1, 2))).astype(
            "int32"
        )
        model = keras.Sequential(
            [
                keras.Input((96, 1)),
                keras.layers.Conv1D(16, 7, activation="relu"),
                keras.layers.Conv1D(16, 5, activation="relu"),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        opt = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(3e-3), initial_scale=2.0**24
        )
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        _fit(model, x, y, logdir, callbacks, epochs=4)
