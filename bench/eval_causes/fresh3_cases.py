"""A third fresh, held-out batch of blow-ups and healthy runs for the cause evaluation.

Written from the cause sections of docs/causes.md by someone who has not read the rules, apart
from cases.py, fresh_cases.py and fresh2_cases.py: other architectures (depthwise-separable
CNNs, Conv3D video, TimeDistributed, Bidirectional taggers, seq2seq with teacher forcing, graph
message passing with tf.gather/unsorted_segment_sum, mixture density networks), other losses
(Cox partial likelihood, triplet, pinball, focal, Poisson, fixed-noise Gaussian), other
optimizers (Adafactor, Adadelta, centered RMSprop, Nesterov SGD with Polynomial/InverseTime
decay), bfloat16 beside mixed_float16, and tf.data pipelines with map and
batch(drop_remainder=True), steps_per_execution.  Meant to be scored once.

Same form as cases.py: each case is `fn(logdir, callbacks)`, a small real Keras 3 training with
`tb_nanwatch.NanWatchCallback(logdir)` plus the given callbacks; `cause` is what the case was built
to do (None for a healthy run).  Nothing heavy is imported at import time.

`UNDO = True` makes every blow-up build its counterfactual instead: the same training with the one
thing its cause names undone (`counterfactuals.py --suite fresh3` runs them; the scored batch never does).
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


def _graph(np, rng, nodes, degree, isolated=()):
    """A random directed graph as (src, dst, in-degree): every node but the isolated ones
    receives messages from `degree` random others."""
    src, dst = [], []
    for node in range(nodes):
        if node in isolated:
            continue
        others = [n for n in range(nodes) if n != node and n not in isolated]
        for s in rng.choice(others, size=degree, replace=False):
            src.append(int(s))
            dst.append(node)
    deg = np.bincount(dst, minlength=nodes).astype("float32")
    return np.array(src, "int32"), np.array(dst, "int32"), deg


def _message_passing(keras, tf, src, dst, nodes, units, aggregate, seed):
    """h' = relu(aggregate(messages from neighbours) W + h V): gather along the edges, then
    unsorted_segment_sum into their destinations; `aggregate(summed, degree)`."""

    class MessagePassing(keras.layers.Layer):
        def build(self, input_shape):
            fan_in = input_shape[-1]
            self.w = self.add_weight(
                shape=(fan_in, units),
                initializer=keras.initializers.GlorotUniform(seed=seed),
                name="neighbour_kernel",
            )
            self.v = self.add_weight(
                shape=(fan_in, units),
                initializer=keras.initializers.GlorotUniform(seed=seed + 1),
                name="self_kernel",
            )

        def call(self, h):
            msgs = tf.transpose(tf.gather(h, src, axis=1), [1, 0, 2])  # (edges, batch, feat)
            summed = tf.transpose(tf.math.unsorted_segment_sum(msgs, dst, nodes), [1, 0, 2])
            agg = aggregate(summed)
            return tf.nn.relu(tf.matmul(agg, self.w) + tf.matmul(h, self.v))

    return MessagePassing()


# 1 -------------------------------------------------------------------------------------------


@case(
    "nonfinite_input",
    "Conv3D video clips standardised per clip in a tf.data map: a blank clip has std 0 (0/0)",
)
def input_conv3d_blank_clip(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(301)
    clips = rng.uniform(0, 255, (256, 6, 12, 12, 1)).astype("float32")
    drift = rng.integers(0, 2, 256)
    clips[drift == 1] += np.linspace(0, 60, 6, dtype="float32")[None, :, None, None, None]
    clips[150] = 16.0  # a black clip from a dead camera: every pixel the same
    y = drift.astype("int32")
    guard = 1e-3 if UNDO else 0.0

    def standardise(clip, label):
        return (clip - tf.reduce_mean(clip)) / (tf.math.reduce_std(clip) + guard), label

    ds = (
        tf.data.Dataset.from_tensor_slices((clips, y))
        .map(standardise)
        .batch(32, drop_remainder=True)
    )
    model = keras.Sequential(
        [
            keras.Input((6, 12, 12, 1)),
            keras.layers.Conv3D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling3D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, ds, None, logdir, callbacks, batch_size=None)


@case(
    None,
    "mixed_bfloat16 Conv3D video classifier (clips scaled to [0, 1]), float32 head, Adam",
)
def healthy_conv3d_bfloat16(logdir, callbacks):
    keras, np, tf, _ = _tf()
    with _policy("mixed_bfloat16"):
        rng = np.random.default_rng(302)
        clips = rng.uniform(0, 1, (256, 6, 12, 12, 1)).astype("float32")
        moving = rng.integers(0, 2, 256)
        clips[moving == 1, :, :, :6] += np.linspace(0, 0.8, 6, dtype="float32")[
            None, :, None, None, None
        ]
        clips = np.clip(clips, 0, 1).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((6, 12, 12, 1)),
                keras.layers.Conv3D(8, 3, activation="relu"),
                keras.layers.MaxPooling3D((1, 2, 2)),
                keras.layers.Conv3D(8, (3, 3, 3), activation="relu"),
                keras.layers.GlobalAveragePooling3D(),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _fit(model, clips, moving.astype("int32"), logdir, callbacks, epochs=4)


@case(
    "optimizer_zero_division",
    "Bidirectional LSTM POS tagger, vocabulary rows no sentence uses, Nadam(epsilon=0)",
)
def zero_div_bilstm_tagger_nadam(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(303)
    # the vocabulary was built on a larger corpus: ids 300..599 never occur in this subset
    tokens = rng.integers(1, 300, (256, 20)).astype("int32")
    tags = (tokens % 5).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((20,), dtype="int32"),
            keras.layers.Embedding(600, 16),
            keras.layers.Bidirectional(keras.layers.LSTM(8, return_sequences=True)),
            keras.layers.Dense(5),
        ]
    )
    opt = keras.optimizers.Nadam(1e-3, epsilon=1e-7 if UNDO else 0.0)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    _fit(model, tokens, tags, logdir, callbacks)


@case(
    "unscaled_targets",
    "GRU seq2seq with teacher forcing forecasting national grid demand in watts (~5e10), SGD 1e-2",
)
def targets_seq2seq_grid_watts(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(304)
    hist = rng.standard_normal((256, 24, 3)).astype("float32")  # standardised weather + load
    future = (5e10 * (1 + 0.05 * hist[:, -12:, :1])).astype("float32")  # next 12 h, in W
    if UNDO:
        future = ((future - future.mean()) / future.std()).astype("float32")
    # teacher forcing: the decoder sees the true previous hour, standardised like the inputs
    load = (future - future.mean()) / future.std()
    shifted = np.concatenate([hist[:, -1:, :1], load[:, :-1]], axis=1).astype("float32")
    enc_in, dec_in = keras.Input((24, 3)), keras.Input((12, 1))
    _, state = keras.layers.GRU(16, return_state=True)(enc_in)
    dec = keras.layers.GRU(16, return_sequences=True)(dec_in, initial_state=state)
    dec = keras.layers.TimeDistributed(keras.layers.Dense(16))(dec)
    out = keras.layers.TimeDistributed(keras.layers.Dense(1))(dec)
    model = keras.Model([enc_in, dec_in], out)
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    _fit(model, [hist, shifted], future, logdir, callbacks)


@case(
    "domain_error",
    "TimeDistributed Conv2D + hand-written per-frame RMS norm x / sqrt(mean(x^2)): padded frames are 0/0",
)
def domain_timedistributed_rmsnorm_padding(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(305)
    frames = rng.uniform(0, 1, (256, 8, 10, 10, 1)).astype("float32")
    length = rng.integers(4, 9, 256)
    for i, n in enumerate(length):
        frames[i, n:] = 0.0  # clips shorter than 8 frames are padded with zero frames
    y = frames[:, :, :5].mean(axis=(1, 2, 3, 4)) > frames[:, :, 5:].mean(axis=(1, 2, 3, 4))
    y = y.astype("int32")

    class FrameRMSNorm(keras.layers.Layer):
        def call(self, x):
            ms = tf.reduce_mean(tf.square(x), axis=[2, 3, 4], keepdims=True)
            return x / tf.sqrt(ms + (1e-6 if UNDO else 0.0))

    model = keras.Sequential(
        [
            keras.Input((8, 10, 10, 1)),
            keras.layers.TimeDistributed(keras.layers.Conv2D(8, 3, activation="relu")),
            FrameRMSNorm(),
            keras.layers.TimeDistributed(keras.layers.GlobalAveragePooling2D()),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, frames, y, logdir, callbacks)


@case(
    "learning_rate_too_high",
    "depthwise-separable CNN, Nesterov SGD, PolynomialDecay from 2.0 (meant 2e-2)",
)
def lr_depthwise_polynomial(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(306)
    x = rng.uniform(0, 1, (256, 16, 16, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2)))[:, None] * 10
    y = y.astype("float32")
    start = 0.2 if UNDO else 2.0
    schedule = keras.optimizers.schedules.PolynomialDecay(start, 60, start / 100)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.DepthwiseConv2D(3, padding="same", activation="relu"),
            keras.layers.Conv2D(16, 1, activation="relu"),
            keras.layers.SeparableConv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "recurrent_explosion",
    "Bidirectional ReLU SimpleRNN sequence denoiser over 160 steps, orthogonal recurrent gain 3.0, Adam",
)
def recurrent_bidirectional_relu_denoiser(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(307)
    x = rng.standard_normal((96, 160, 3)).astype("float32")
    # per step: the signal smoothed over the last 5 steps (a denoising tagger)
    y = np.stack([x[:, max(0, t - 4) : t + 1, 0].mean(axis=1) for t in range(160)], axis=1)
    y = y[..., None].astype("float32")
    gain = 0.9 if UNDO else 3.0  # ReLU halves the state's energy: 3.0 is a growth of ~2
    rnn = keras.layers.SimpleRNN(
        8,
        activation="relu",
        return_sequences=True,
        recurrent_initializer=keras.initializers.Orthogonal(gain=gain, seed=7),
    )
    model = keras.Sequential(
        [
            keras.Input((160, 3)),
            keras.layers.Bidirectional(rnn),
            keras.layers.TimeDistributed(keras.layers.Dense(1)),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=2)


@case(
    None,
    "GRU encoder-decoder (Embedding, teacher forcing) learning to reverse digit strings, RMSprop",
)
def healthy_seq2seq_reverse_digits(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(308)
    src = rng.integers(1, 11, (384, 8)).astype("int32")
    tgt = src[:, ::-1]
    dec_in = np.concatenate([np.zeros((384, 1), "int32"), tgt[:, :-1]], axis=1)  # 0 = <start>
    s_in, d_in = keras.Input((8,), dtype="int32"), keras.Input((8,), dtype="int32")
    _, state = keras.layers.GRU(32, return_state=True)(keras.layers.Embedding(11, 16)(s_in))
    dec = keras.layers.GRU(32, return_sequences=True)(
        keras.layers.Embedding(11, 16)(d_in), initial_state=state
    )
    model = keras.Model([s_in, d_in], keras.layers.Dense(11)(dec))
    model.compile(
        keras.optimizers.RMSprop(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, [src, dec_in], tgt, logdir, callbacks, epochs=4)


@case(
    "reduced_precision_overflow",
    "mixed_float16 GIN-style graph net: 4 rounds of unnormalised neighbour sums (degree 40) in float16",
)
def fp16_graph_sum_aggregation(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(309)
    nodes = 48
    src, dst, _deg = _graph(np, rng, nodes, 40)
    with _policy("float32" if UNDO else "mixed_float16"):
        x = np.abs(rng.standard_normal((256, nodes, 8))).astype("float32")  # node descriptors
        y = x[:, :, :2].mean(axis=(1, 2))[:, None].astype("float32")
        inp = keras.Input((nodes, 8))
        h = inp
        for i in range(4):
            h = _message_passing(keras, tf, src, dst, nodes, 16, lambda s: s, seed=10 * i)(h)
        h = keras.layers.GlobalAveragePooling1D()(h)
        h = keras.layers.LayerNormalization(dtype="float32")(h)
        model = keras.Model(inp, keras.layers.Dense(1, dtype="float32")(h))
        model.compile(keras.optimizers.Adam(1e-3), "mse")
        _fit(model, x, y, logdir, callbacks)


@case(
    "nonfinite_target",
    "Bidirectional GRU tagger, per-token sample weights 1/sentence length: an empty sentence is 0/0",
)
def target_token_weights_empty_sentence(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(310)
    length = rng.integers(3, 16, 256)
    length[100] = 0  # a blank line in the corpus became an all-padding sentence
    tokens = rng.integers(1, 200, (256, 16)).astype("int32")
    mask = np.arange(16)[None, :] < length[:, None]
    tokens[~mask] = 0
    tags = (tokens % 3).astype("int32")
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = mask / (np.maximum(length, 1) if UNDO else length)[:, None]
    weights = weights.astype("float32")  # each sentence counts once, whatever its length
    model = keras.Sequential(
        [
            keras.Input((16,), dtype="int32"),
            keras.layers.Embedding(200, 16),
            keras.layers.Bidirectional(keras.layers.GRU(8, return_sequences=True)),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, tokens, tags, logdir, callbacks, shuffle=False, sample_weight=weights)


@case(
    "large_initial_weights",
    "EfficientNet-ish depthwise + pointwise conv stack with RandomNormal(stddev=10) kernels, SGD",
)
def init_depthwise_stddev10(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(311)
    x = rng.uniform(0, 1, (256, 16, 16, 3)).astype("float32")
    y = (x[..., 1].mean(axis=(1, 2)) > 0.5).astype("float32")[:, None]

    def init(i):
        if UNDO:
            return keras.initializers.HeNormal(seed=i)
        return keras.initializers.RandomNormal(stddev=10.0, seed=i)

    layers = [keras.Input((16, 16, 3)), keras.layers.Conv2D(16, 1, kernel_initializer=init(0))]
    for i in range(3):
        layers.append(
            keras.layers.DepthwiseConv2D(
                3, padding="same", activation="relu", depthwise_initializer=init(2 * i + 1)
            )
        )
        layers.append(
            keras.layers.Conv2D(16, 1, activation="relu", kernel_initializer=init(2 * i + 2))
        )
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "unstable_loss",
    "hand-written Cox partial likelihood divided by the number of events: an all-censored batch is 0/0",
)
def loss_cox_all_censored_batch(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(312)
    x = rng.standard_normal((320, 10)).astype("float32")
    risk = x[:, 0] - 0.5 * x[:, 1]
    time = rng.exponential(np.exp(-risk)) * 365
    follow_up = np.linspace(2000, 5, 320)  # the last patients enrolled were followed briefly
    event = (time <= follow_up).astype("float32")
    time = np.minimum(time, follow_up)
    order = np.argsort(-follow_up, kind="stable")
    x, time, event = x[order], time[order], event[order]
    event[-32:] = 0.0  # administrative censoring: nobody in the last batch had an event yet
    y = np.stack([time, event], axis=1).astype("float32")

    def cox_nll(y_true, risk_pred):
        t, e = y_true[:, 0], y_true[:, 1]
        r = tf.reshape(risk_pred, [-1])
        order = tf.argsort(t, direction="DESCENDING")
        r, e = tf.gather(r, order), tf.gather(e, order)
        log_risk_set = tf.math.log(tf.cumsum(tf.exp(r)))
        n_events = tf.reduce_sum(e)
        if UNDO:
            n_events = tf.maximum(n_events, 1.0)
        return -tf.reduce_sum(e * (r - log_risk_set)) / n_events

    model = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-3), cox_nll)
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case(
    None,
    "EfficientNet-ish MBConv (expand, DepthwiseConv2D, squeeze-excite, swish, BatchNorm), Nesterov SGD",
)
def healthy_mbconv_squeeze_excite(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(313)
    x = rng.uniform(0, 1, (256, 16, 16, 3)).astype("float32")
    y = (x[:, :8, :, 0].mean(axis=(1, 2)) > x[:, 8:, :, 0].mean(axis=(1, 2))).astype("int32")

    def mbconv(h, filters):
        e = keras.layers.Conv2D(filters * 4, 1, use_bias=False)(h)
        e = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(e))
        e = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(e)
        e = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(e))
        s = keras.layers.GlobalAveragePooling2D(keepdims=True)(e)
        s = keras.layers.Conv2D(filters, 1, activation="swish")(s)
        s = keras.layers.Conv2D(filters * 4, 1, activation="sigmoid")(s)
        e = keras.layers.Multiply()([e, s])
        p = keras.layers.BatchNormalization()(keras.layers.Conv2D(filters, 1, use_bias=False)(e))
        return keras.layers.Add()([h, p])

    inp = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="swish")(inp)
    h = mbconv(mbconv(h, 8), 8)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    schedule = keras.optimizers.schedules.PolynomialDecay(0.05, 40, 5e-3)
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(
    "optimizer_state_overflow",
    "Adam(amsgrad), Gaussian NLL with a fixed noise sigma of 1e-10 (metres entered as km): g ~ 1e20",
)
def slot_amsgrad_fixed_sigma(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(314)
    x = rng.standard_normal((320, 12)).astype("float32")
    y = (0.5 * x[:, :3].sum(axis=1, keepdims=True)).astype("float32")
    sigma = 0.1 if UNDO else 1e-10  # the instrument's precision, in the wrong unit

    def gaussian_nll(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred)) / (2 * sigma**2)

    model = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(32, activation="gelu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-3, amsgrad=True), gaussian_nll)
    _fit(model, x, y, logdir, callbacks)


@case(
    "unscaled_inputs",
    "MLP regression of bike rentals on raw road lengths in mm (~1e7) beside small features, SGD 1e-4",
)
def inputs_rentals_road_mm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(315)
    road_mm = rng.uniform(2e6, 4e7, (320, 1))  # cycle lanes per district, in millimetres
    stations = rng.uniform(1, 30, (320, 1))
    rain = rng.uniform(0, 1, (320, 1))
    rate = np.exp(0.5 + 0.8 * road_mm / 4e7 - rain)
    y = rng.poisson(rate).astype("float32")
    x = np.concatenate([road_mm, stations, rain], axis=1).astype("float32")
    if UNDO:
        x = ((x - x.mean(0)) / x.std(0)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-4), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "exploding_gradients",
    "Transformer-style stack, 12 blocks of MultiHeadAttention + MLP residuals, no LayerNorm, SGD 1e-3",
)
def grad_transformer_without_layernorm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(316)
    x = rng.standard_normal((256, 8, 16)).astype("float32")
    y = (x[:, :, 0].mean(axis=1, keepdims=True) * x[:, 0, 1:2]).astype("float32")
    inp = keras.Input((8, 16))
    h = inp
    for i in range(12):
        # each residual branch adds its own variance (no normalisation, no scaled-down
        # output projection): activations and gradients double sublayer over sublayer
        out_init = "zeros" if UNDO else keras.initializers.HeNormal(seed=3 * i)
        a = keras.layers.MultiHeadAttention(
            2, 8, kernel_initializer=keras.initializers.HeNormal(seed=3 * i + 1)
        )(h, h)
        h = keras.layers.Add()([h, keras.layers.Dense(16, kernel_initializer=out_init)(a)])
        m = keras.layers.Dense(
            32, activation="relu", kernel_initializer=keras.initializers.HeNormal(seed=3 * i + 2)
        )(h)
        h = keras.layers.Add()([h, keras.layers.Dense(16, kernel_initializer=out_init)(m)])
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    None,
    "imbalanced binary classifier, BinaryFocalCrossentropy, Adam, steps_per_execution=4",
)
def healthy_focal_steps_per_execution(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(317)
    x = rng.standard_normal((512, 16)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 1.6).astype("float32")[:, None]  # ~7% positives
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.BinaryFocalCrossentropy(gamma=2.0, apply_class_balancing=True),
        steps_per_execution=4,
    )
    _fit(model, x, y, logdir, callbacks, epochs=8)


@case(
    "nonfinite_input",
    "TimeDistributed Dense over daily log returns log(p_t / p_t-1): a delisted price of 0 gives -Inf, then NaN",
)
def input_log_returns_zero_price(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(318)
    prices = 50 * np.exp(np.cumsum(0.02 * rng.standard_normal((256, 31, 4)), axis=1))
    prices[120, 17:, 2] = 0.0  # a delisted ticker reports a price of 0
    if UNDO:
        prices = np.maximum(prices, 1e-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        returns = np.log(prices[:, 1:] / prices[:, :-1]).astype("float32")
    y = (prices[:, -1, 0] > prices[:, -6, 0]).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((30, 4)),
            keras.layers.TimeDistributed(keras.layers.Dense(8, activation="relu")),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(
        keras.optimizers.SGD(1e-2, momentum=0.9, nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    _fit(model, returns, y, logdir, callbacks, shuffle=False)


@case(
    "domain_error",
    "graph net with mean aggregation sum / in-degree inside the layer: an isolated node is 0/0",
)
def domain_graph_mean_isolated_node(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(319)
    nodes = 20
    src, dst, deg = _graph(np, rng, nodes, 4, isolated=(13,))  # a user with no followers
    x = rng.standard_normal((256, nodes, 6)).astype("float32")
    y = x[:, :, 0].mean(axis=1, keepdims=True).astype("float32")

    def mean(summed):
        if UNDO:
            return tf.math.divide_no_nan(summed, deg[None, :, None])
        return summed / deg[None, :, None]

    inp = keras.Input((nodes, 6))
    h = _message_passing(keras, tf, src, dst, nodes, 16, mean, seed=1)(inp)
    h = _message_passing(keras, tf, src, dst, nodes, 16, mean, seed=3)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "recurrent_explosion",
    "IndRNN cell relu(u * h + W x) in keras.layers.RNN, recurrent weights uniform(0, 1.2), 600 steps",
)
def recurrent_indrnn_unconstrained(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(320)
    x = np.abs(rng.standard_normal((128, 600, 2)) * 0.3).astype("float32")
    y = x[:, -30:, 1].mean(axis=1, keepdims=True).astype("float32")

    class IndRNNCell(keras.layers.Layer):
        """Independently recurrent: each unit multiplies its own state by u (meant |u| <= 1)."""

        def __init__(self, units, **kw):
            super().__init__(**kw)
            self.units = units
            self.state_size = units

        def build(self, input_shape):
            high = 0.95 if UNDO else 1.2
            self.u = self.add_weight(
                shape=(self.units,),
                initializer=keras.initializers.RandomUniform(0.0, high, seed=5),
                name="recurrent_kernel",
            )
            self.w = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")

        def call(self, x, states):
            h = tf.nn.relu(self.u * states[0] + tf.matmul(x, self.w))
            return h, [h]

    model = keras.Sequential(
        [keras.Input((600, 2)), keras.layers.RNN(IndRNNCell(16)), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=2)


@case(
    None,
    "GRU multi-quantile forecaster, hand-written pinball loss (q = 0.1, 0.5, 0.9), Adadelta(1.0)",
)
def healthy_gru_pinball_adadelta(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(321)
    x = rng.standard_normal((384, 20, 2)).astype("float32")
    y = (x[:, -5:, 0].mean(axis=1) + 0.3 * rng.standard_normal(384))[:, None].astype("float32")
    quantiles = tf.constant([[0.1, 0.5, 0.9]])

    def pinball(y_true, y_pred):
        err = y_true - y_pred
        return tf.reduce_mean(tf.maximum(quantiles * err, (quantiles - 1) * err))

    model = keras.Sequential([keras.Input((20, 2)), keras.layers.GRU(16), keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adadelta(1.0), pinball)
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(
    "unscaled_targets",
    "MLP predicting flight distances in millimetres (~1e9), SGD with InverseTimeDecay from 1e-3",
)
def targets_flight_distance_mm(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(322)
    x = rng.standard_normal((384, 8)).astype("float32")  # standardised route features
    y = (1.5e9 * np.exp(0.3 * x[:, :1])).astype("float32")  # ~1500 km, in mm
    if UNDO:
        y = ((y - y.mean()) / y.std()).astype("float32")
    schedule = keras.optimizers.schedules.InverseTimeDecay(1e-3, 10, 0.5)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(schedule), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "reduced_precision_overflow",
    "mixed_float16 Conv3D with a motion-energy layer: sum over time of squared frame differences",
)
def fp16_conv3d_motion_energy(logdir, callbacks):
    keras, np, tf, _ = _tf()

    class MotionEnergy(keras.layers.Layer):
        """Per pixel, the summed squared change between consecutive frames, rescaled after."""

        def call(self, clip):
            diff = clip[:, 1:] - clip[:, :-1]
            energy = tf.reduce_sum(tf.square(diff), axis=1, keepdims=True)
            return tf.concat([clip[:, :1] / 255.0, energy / 1e5], axis=1)

    with _policy("float32" if UNDO else "mixed_float16"):
        rng = np.random.default_rng(323)
        clips = rng.uniform(0, 255, (192, 9, 12, 12, 1)).astype("float32")
        still = rng.integers(0, 2, 192)
        clips[still == 1] = clips[still == 1, :1]  # a static scene: all frames the same
        model = keras.Sequential(
            [
                keras.Input((9, 12, 12, 1)),
                MotionEnergy(),
                keras.layers.Conv3D(8, (2, 3, 3), activation="relu"),
                keras.layers.GlobalAveragePooling3D(),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
        model.compile(
            keras.optimizers.Adam(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        _fit(model, clips, still.astype("int32"), logdir, callbacks)


@case(
    None,
    "Cox partial likelihood (guarded: divide_no_nan by the events) via tf.data map + drop_remainder",
)
def healthy_cox_tfdata_guarded(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(324)
    x = rng.standard_normal((384, 8)).astype("float32")
    risk = x[:, 0] - 0.5 * x[:, 1]
    time = rng.exponential(np.exp(-risk)).astype("float32")
    event = (rng.uniform(0, 1, 384) < 0.7).astype("float32")

    def cox_nll(y_true, risk_pred):
        t, e = y_true[:, 0], y_true[:, 1]
        r = tf.reshape(risk_pred, [-1])
        order = tf.argsort(t, direction="DESCENDING")
        r, e = tf.gather(r, order), tf.gather(e, order)
        log_risk_set = tf.math.reduce_logsumexp(
            tf.where(tf.linalg.band_part(tf.ones((tf.size(r), tf.size(r))), -1, 0) > 0, r, -1e9),
            axis=1,
        )
        return tf.math.divide_no_nan(-tf.reduce_sum(e * (r - log_risk_set)), tf.reduce_sum(e))

    ds = (
        tf.data.Dataset.from_tensor_slices((x, time, event))
        .map(lambda a, t, e: (a, tf.stack([t, e])))
        .batch(48, drop_remainder=True)
    )
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(3e-3), cox_nll)
    _fit(model, ds, None, logdir, callbacks, batch_size=None, epochs=6)


@case(
    "optimizer_zero_division",
    "TimeDistributed Dense over sensor channels, one channel always 0 (unplugged), Adadelta(epsilon=0)",
)
def zero_div_adadelta_dead_channel(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(325)
    x = rng.standard_normal((320, 15, 5)).astype("float32")
    x[..., 4] = 0.0  # the fifth sensor was unplugged for the whole campaign
    y = (x[:, :, 0].mean(axis=1) > 0).astype("float32")[:, None]
    model = keras.Sequential(
        [
            keras.Input((15, 5)),
            keras.layers.TimeDistributed(keras.layers.Dense(8, activation="tanh")),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    opt = keras.optimizers.Adadelta(1.0, epsilon=1e-7 if UNDO else 0.0)
    model.compile(opt, "binary_crossentropy")
    _fit(model, x, y, logdir, callbacks)


@case(
    "learning_rate_too_high",
    "standardised tabular regression, tanh MLP, SGD 0.3 with momentum 0.95, steps_per_execution=8",
)
def lr_momentum_steps_per_execution(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(326)
    x = rng.standard_normal((512, 12)).astype("float32")
    y = (x @ rng.standard_normal((12, 1)) * 0.5 + np.sin(x[:, :1])).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.03 if UNDO else 0.3, momentum=0.95), "mse", steps_per_execution=8
    )
    _fit(model, x, y, logdir, callbacks, epochs=6)


@case(
    None,
    "Bidirectional LSTM tagger on padded sentences (mask_zero), TimeDistributed head, Nadam",
)
def healthy_masked_bilstm_tagger(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(327)
    length = rng.integers(4, 18, 384)
    tokens = rng.integers(1, 120, (384, 18)).astype("int32")
    tokens[np.arange(18)[None, :] >= length[:, None]] = 0
    tags = np.where(tokens == 0, 0, 1 + (tokens % 4)).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((18,), dtype="int32"),
            keras.layers.Embedding(120, 16, mask_zero=True),
            keras.layers.Bidirectional(keras.layers.LSTM(16, return_sequences=True)),
            keras.layers.TimeDistributed(keras.layers.Dense(5)),
        ]
    )
    model.compile(
        keras.optimizers.Nadam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    _fit(model, tokens, tags, logdir, callbacks, epochs=4)


@case(
    "large_initial_weights",
    "20-layer ReLU MLP with VarianceScaling(scale=200) (meant 2.0), centered RMSprop",
)
def init_variance_scaling_typo(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(328)
    x = rng.standard_normal((320, 24)).astype("float32")
    y = (x[:, :6].sum(axis=1, keepdims=True) * 0.4).astype("float32")
    scale = 2.0 if UNDO else 200.0
    layers = [keras.Input((24,))]
    for i in range(20):
        layers.append(
            keras.layers.Dense(
                32,
                activation="relu",
                kernel_initializer=keras.initializers.VarianceScaling(scale, seed=i),
            )
        )
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.RMSprop(1e-3, centered=True), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "unstable_loss",
    "triplet loss on sqrt(sum(d^2)) distances, margin 1; some positives are exact copies (sqrt'(0))",
)
def loss_triplet_sqrt_duplicate_positive(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(329)
    anchor = rng.standard_normal((320, 12)).astype("float32")
    positive = (anchor + 0.2 * rng.standard_normal((320, 12))).astype("float32")
    positive[200:210] = anchor[200:210]  # augmentation was off for these: exact copies
    negative = rng.standard_normal((320, 12)).astype("float32")
    tower = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(8)]
    )
    ia, ip, i_n = keras.Input((12,)), keras.Input((12,)), keras.Input((12,))
    out = keras.layers.Concatenate()([tower(ia), tower(ip), tower(i_n)])
    model = keras.Model([ia, ip, i_n], out)
    eps = 1e-12 if UNDO else 0.0

    def triplet(y_true, emb):
        a, p, n = tf.split(emb, 3, axis=1)
        d_ap = tf.sqrt(tf.reduce_sum(tf.square(a - p), axis=1) + eps)
        d_an = tf.sqrt(tf.reduce_sum(tf.square(a - n), axis=1) + eps)
        return tf.reduce_mean(tf.nn.relu(d_ap - d_an + 1.0))

    model.compile(keras.optimizers.Adam(1e-3), triplet)
    dummy = np.zeros((320, 1), "float32")
    _fit(model, [anchor, positive, negative], dummy, logdir, callbacks, shuffle=False)


@case(
    None,
    "graph net with guarded mean aggregation (divide_no_nan, an isolated node), Adam",
)
def healthy_graph_mean_guarded(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(330)
    nodes = 20
    src, dst, deg = _graph(np, rng, nodes, 3, isolated=(4,))
    x = rng.standard_normal((320, nodes, 6)).astype("float32")
    y = (x[:, :, 0] > 0).mean(axis=1, keepdims=True).astype("float32")

    def mean(summed):
        return tf.math.divide_no_nan(summed, deg[None, :, None])

    inp = keras.Input((nodes, 6))
    h = _message_passing(keras, tf, src, dst, nodes, 16, mean, seed=21)(inp)
    h = _message_passing(keras, tf, src, dst, nodes, 16, mean, seed=23)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    _fit(model, x, y, logdir, callbacks, epochs=4)


@case(
    "exploding_gradients",
    "EfficientNet without BatchNorm: 24 residual depthwise-separable blocks, He-scale branches, SGD 1e-3",
)
def grad_residual_separable_no_bn(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(331)
    x = rng.uniform(0, 1, (256, 12, 12, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2)))[:, None].astype("float32")
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(16, 3, padding="same")(inp)
    for i in range(24):
        # He scale for a 3x3 depthwise kernel (fan-in 9; Keras counts 9 x 16 channels)
        he_depthwise = keras.initializers.VarianceScaling(32.0, seed=2 * i)
        r = keras.layers.DepthwiseConv2D(
            3, padding="same", activation="relu", depthwise_initializer=he_depthwise
        )(h)
        last = "zeros" if UNDO else keras.initializers.HeNormal(seed=2 * i + 1)
        r = keras.layers.Conv2D(16, 1, kernel_initializer=last)(r)
        h = keras.layers.Add()([h, r])
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x, y, logdir, callbacks)


@case(
    "nonfinite_target",
    "pinball-loss delivery-time model on log(minutes): a delivery logged at 0 minutes is -Inf",
)
def target_log_delivery_time_zero(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(332)
    x = rng.standard_normal((320, 9)).astype("float32")
    minutes = np.round(np.exp(3.2 + 0.3 * x[:, 0] + 0.2 * rng.standard_normal(320)))
    minutes[77] = 0.0  # the driver tapped 'delivered' at pickup
    if UNDO:
        minutes = np.maximum(minutes, 1.0)
    with np.errstate(divide="ignore"):
        y = np.log(minutes)[:, None].astype("float32")

    def pinball_90(y_true, y_pred):
        err = y_true - y_pred
        return tf.reduce_mean(tf.maximum(0.9 * err, -0.1 * err))

    model = keras.Sequential(
        [keras.Input((9,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-3), pinball_90)
    _fit(model, x, y, logdir, callbacks, shuffle=False)


@case(
    None,
    "mixture density network (3 Gaussians, softplus + 1e-3 sigma, logsumexp NLL) on bimodal data",
)
def healthy_mixture_density(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(333)
    x = rng.uniform(-1, 1, (384, 1)).astype("float32")
    branch = rng.integers(0, 2, (384, 1))
    y = np.where(branch == 1, np.sin(3 * x), -np.sin(3 * x)) + 0.1 * rng.standard_normal((384, 1))
    y = y.astype("float32")
    k = 3

    def mdn_nll(y_true, params):
        logits, mu, raw = params[:, :k], params[:, k : 2 * k], params[:, 2 * k :]
        sigma = tf.nn.softplus(raw) + 1e-3
        log_pdf = -0.5 * tf.square((y_true - mu) / sigma) - tf.math.log(sigma) - 0.9189385
        return -tf.reduce_mean(tf.reduce_logsumexp(tf.nn.log_softmax(logits) + log_pdf, axis=1))

    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(3 * k),
        ]
    )
    model.compile(keras.optimizers.Adam(3e-3), mdn_nll)
    _fit(model, x, y, logdir, callbacks, epochs=5)


@case(
    "unscaled_inputs",
    "depthwise-separable CNN on raw HDR radiance (linear sensor values ~1e5), SGD 1e-3",
)
def inputs_hdr_radiance_separable(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(334)
    img = rng.uniform(0, 1, (256, 16, 16, 3)).astype("float32")
    y = (img[..., 0].mean(axis=(1, 2)) > img[..., 1].mean(axis=(1, 2)))[:, None].astype("float32")
    x = img * 2e5  # linear radiance straight from the RAW file
    if UNDO:
        x = img
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.SeparableConv2D(16, 3, activation="relu"),
            keras.layers.DepthwiseConv2D(3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    _fit(model, x.astype("float32"), y, logdir, callbacks)


@case(
    "optimizer_state_overflow",
    "two-task model, loss_weights = 1 / var(target) per task; one target in farads (var ~1e-24)",
)
def slot_rmsprop_inverse_target_variance(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(335)
    x = rng.standard_normal((320, 10)).astype("float32")
    resistance = (x[:, :2].sum(axis=1, keepdims=True)).astype("float32")
    capacitance = (1e-12 * (2 + x[:, 2:3])).astype("float32")  # in farads
    # uncertainty-style task weighting: each task's loss divided by its target's variance
    weights = [1.0 / resistance.var(), 1.0 / capacitance.var()]
    if UNDO:
        weights = [1.0, 1.0]
    inp = keras.Input((10,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    model = keras.Model(inp, [keras.layers.Dense(1)(h), keras.layers.Dense(1)(h)])
    model.compile(
        keras.optimizers.RMSprop(1e-3, centered=True),
        ["mse", "mse"],
        loss_weights=[float(w) for w in weights],
    )
    _fit(model, x, [resistance, capacitance], logdir, callbacks)


@case(
    None,
    "Poisson count regression with an exponential output and Keras' poisson loss, centered RMSprop",
)
def healthy_poisson_exponential_rmsprop(logdir, callbacks):
    keras, np, tf, _ = _tf()
    rng = np.random.default_rng(336)
    x = rng.standard_normal((384, 6)).astype("float32")
    y = rng.poisson(np.exp(0.8 + 0.5 * x[:, 0] - 0.3 * x[:, 1]))[:, None].astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="exponential"),
        ]
    )
    model.compile(keras.optimizers.RMSprop(3e-3, centered=True), "poisson")
    _fit(model, x, y, logdir, callbacks, epochs=4)
