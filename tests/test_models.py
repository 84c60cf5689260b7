"""The writer on the models people train: Keras RNN layers, a Transformer block, CNNs with
BatchNormalization, multi-IO, shared layers, a GAN's custom train_step, compile and optimizer
options, keras.applications.  Each case is checked for
  (a) it runs with NanWatchCallback and watches the layers and optimizers it should,
  (c) a NaN injected into one layer's weight at a known step is named at that layer, kind and
      step, as found by running the step's batch through the layers eagerly (model_matrix),
  (b) training unchanged: after the steps before the injection, every model and optimizer
      variable bitwise equal to a plain fit's with the same seed and data.
Then misuse, repeated fit()/evaluate(), and the model's life after fit (save, load elsewhere).
"""

import logging
import os
import subprocess
import sys
import textwrap

import keras
import model_matrix as mm
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

import tb_nanwatch
from tb_nanwatch import reader, summary

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B = mm.BATCH


@pytest.fixture(autouse=True, scope="module")
def op_determinism():
    """Bitwise comparisons need deterministic ops; other test files run without."""
    was = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    yield
    if not was:
        tf_config.disable_op_determinism()


class TrainingChanged(AssertionError):
    """The watched run's variables differ from the plain run's (see KNOWN_DIFFERENT)."""


def rng():
    return np.random.default_rng(0)


def floats(*shape):
    return rng().normal(size=shape).astype("float32")


# ---------------------------------------------------------------------------------- the cases
def mlp(optimizer="adam", regularized=False, **compile_kwargs):
    def build():
        reg = (
            dict(
                kernel_regularizer=keras.regularizers.L2(1e-3),
                bias_regularizer=keras.regularizers.L1(1e-4),
                activity_regularizer=keras.regularizers.L2(1e-5),
            )
            if regularized
            else {}
        )
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh", name="hidden", **reg),
                keras.layers.Dense(8, name="hidden2", **reg),
                keras.layers.ReLU(name="relu"),
                keras.layers.Dense(1, name="head"),
            ]
        )
        opt = optimizer() if callable(optimizer) else optimizer
        model.compile(optimizer=opt, loss="mse", **compile_kwargs)
        return model

    return build


def mlp_case(name, optimizer="adam", steps=4, inject_step=3, **kwargs):
    x = floats(steps * B, 6)
    return mm.Case(
        name,
        mlp(optimizer, **kwargs),
        x,
        x[:, :1] * 2.0,
        target="hidden2",
        steps=steps,
        inject_step=inject_step,
    )


def recurrent(layer_fn):
    def build():
        model = keras.Sequential(
            [
                keras.Input((5, 3)),
                keras.layers.Dense(4, name="pre"),
                layer_fn(),
                keras.layers.Dense(1, name="head"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
        return model

    return build


def rnn_case(name, layer_fn, cell_in_loop):
    x = floats(4 * B, 5, 3)
    case = mm.Case(name, recurrent(layer_fn), x, x[:, -1, :1], target="rnn")
    case.cell_in_loop = cell_in_loop
    return case


def time_distributed():
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.TimeDistributed(keras.layers.Dense(4), name="td"),
            keras.layers.GRU(4, name="rnn"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def conv_lstm():
    model = keras.Sequential(
        [
            keras.Input((3, 6, 6, 1)),
            keras.layers.Conv3D(2, 1, name="pre"),
            keras.layers.ConvLSTM2D(2, 3, name="rnn"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def transformer():
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(50, 8, name="embed")(tokens)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(x, x)
    x = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add(name="add1")([x, attended]))
    ffn = keras.layers.Dense(8, name="ffn2")(
        keras.layers.Dense(16, activation="relu", name="ffn1")(x)
    )
    x = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add(name="add2")([x, ffn]))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    out = keras.layers.Dense(2, activation="softmax", name="head")(
        keras.layers.Dropout(0.1, name="drop")(x)
    )
    model = keras.Model(tokens, out, name="transformer")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def conv_bn(jit_compile=False):
    def build():
        model = keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                keras.layers.Conv2D(4, 3, name="conv1"),
                keras.layers.BatchNormalization(name="bn1"),
                keras.layers.ReLU(name="relu1"),
                keras.layers.Dropout(0.3, name="drop"),
                keras.layers.Conv2D(4, 3, name="conv2"),
                keras.layers.BatchNormalization(name="bn2"),
                keras.layers.GlobalAveragePooling2D(name="pool"),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=jit_compile
        )
        return model

    return build


def multi_io():
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    joined = keras.layers.Concatenate(name="join")(
        [keras.layers.Dense(4, name="da")(a), keras.layers.Dense(4, name="db")(b)]
    )
    shared = keras.layers.ReLU(name="relu")(keras.layers.Dense(8, name="shared")(joined))
    outputs = {
        "out1": keras.layers.Dense(1, name="out1")(shared),
        "out2": keras.layers.Dense(3, activation="softmax", name="out2")(shared),
    }
    model = keras.Model({"a": a, "b": b}, outputs, name="multi_io")
    model.compile(
        optimizer="adam",
        loss={"out1": "mse", "out2": "sparse_categorical_crossentropy"},
        loss_weights={"out1": 1.0, "out2": 0.5},
    )
    return model


def siamese():
    encoder = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="enc_dense"),
            keras.layers.Dense(4, name="enc_out"),
        ],
        name="encoder",
    )
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    distance = keras.layers.Subtract(name="diff")([encoder(a), encoder(b)])
    out = keras.layers.Dense(1, activation="sigmoid", name="head")(distance)
    model = keras.Model({"a": a, "b": b}, out, name="siamese")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def shared_dense():
    """One Dense called twice in the step, around another: a site per call, weights once."""
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    outputs = keras.layers.Dense(1, name="head")(
        shared(keras.layers.Dense(4, name="middle")(shared(inputs)))
    )
    model = keras.Model(inputs, outputs, name="shared_dense")
    model.compile(optimizer="adam", loss="mse")
    return model


def siamese_truth(model):
    # The shared encoder's first call is the step's first to compute it: on input a.
    encoder_truth = mm.layer_outputs_truth(model.get_layer("encoder"), prefix="encoder/")
    return lambda x: encoder_truth(x["a"])


LATENT = 4


class GAN(keras.Model):
    """keras.io's GAN (train_step with a discriminator and a generator optimizer), on vectors."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="d_hidden"),
                keras.layers.LeakyReLU(0.2, name="d_leaky"),
                keras.layers.Dense(1, name="d_out"),
            ],
            name="discriminator",
        )
        self.generator = keras.Sequential(
            [
                keras.Input((LATENT,)),
                keras.layers.Dense(8, name="g_hidden"),
                keras.layers.LeakyReLU(0.2, name="g_leaky"),
                keras.layers.Dense(6, name="g_out"),
            ],
            name="generator",
        )
        self.seed_generator = keras.random.SeedGenerator(1337)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn

    def train_step(self, real):
        batch = tf.shape(real)[0]
        latent = keras.random.normal((batch, LATENT), seed=self.seed_generator)
        generated = self.generator(latent)
        combined = tf.concat([generated, real], axis=0)
        labels = tf.concat([tf.ones((batch, 1)), tf.zeros((batch, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(combined))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        latent = keras.random.normal((batch, LATENT), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((batch, 1)), self.discriminator(self.generator(latent)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan():
    model = GAN()
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.optimizers.SGD(1e-2, momentum=0.5),
        keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return model


def gan_truth(model):
    generator_truth = mm.layer_outputs_truth(model.generator, prefix="generator/")
    return lambda x: generator_truth(np.ones((len(x), LATENT), "float32"))


def app(constructor, **kwargs):
    def build():
        model = constructor(input_shape=(32, 32, 3), weights=None, classes=10, **kwargs)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    return build


def images(n, shape, classes):
    r = rng()
    return r.uniform(0, 1, size=(n,) + shape).astype("float32"), r.integers(
        0, classes, size=(n,)
    ).astype("int32")


def cases():
    out = []
    for kind in ("LSTM", "GRU", "SimpleRNN"):
        for unroll in (False, True):
            layer = getattr(keras.layers, kind)
            out.append(
                rnn_case(
                    "%s_unroll_%s" % (kind.lower(), unroll),
                    lambda layer=layer, unroll=unroll: layer(6, unroll=unroll, name="rnn"),
                    cell_in_loop=not unroll,
                )
            )
    out.append(
        rnn_case(
            "bidirectional_gru",
            lambda: keras.layers.Bidirectional(keras.layers.GRU(4), name="rnn"),
            cell_in_loop=False,
        )
    )
    x = floats(4 * B, 5, 3)
    out.append(mm.Case("time_distributed_dense", time_distributed, x, x[:, -1, :1], target="td"))
    x = floats(4 * B, 3, 6, 6, 1)
    out.append(mm.Case("conv_lstm2d", conv_lstm, x, x[:, -1, 0, 0, :1], target="rnn"))
    tokens = rng().integers(0, 50, size=(4 * B, 6)).astype("int32")
    out.append(
        mm.Case(
            "transformer_block",
            transformer,
            tokens,
            (tokens[:, 0] % 2).astype("int32"),
            target="mha",
        )
    )
    x, y = images(4 * B, (8, 8, 3), 3)
    out.append(mm.Case("conv_batchnorm_dropout", conv_bn(), x, y, target="conv2"))
    out.append(mm.Case("jit_compile", conv_bn(jit_compile=True), x, y, target="conv2"))
    x = {"a": floats(4 * B, 4), "b": floats(4 * B, 3)}
    y = {"out1": x["a"][:, :1], "out2": (x["b"][:, 0] > 0).astype("int32")}
    out.append(mm.Case("multi_io_dict_losses", multi_io, x, y, target="shared"))
    x = {"a": floats(4 * B, 4), "b": floats(4 * B, 4)[::-1].copy()}
    out.append(
        mm.Case(
            "siamese_shared_encoder",
            siamese,
            x,
            (x["a"][:, :1] > 0).astype("float32"),
            target="encoder/enc_out",
            truth=siamese_truth,
        )
    )
    # The ground truth leaves out the layer called twice (two graph nodes): `middle` comes first.
    x = floats(4 * B, 4)
    out.append(mm.Case("shared_dense_called_twice", shared_dense, x, x[:, :1], target="middle"))
    out.append(
        mm.Case(
            "gan_two_optimizers",
            gan,
            floats(4 * B, 6),
            None,
            target="generator/g_hidden",
            truth=gan_truth,
            optimizers=lambda m: [m.d_optimizer, m.g_optimizer],
        )
    )
    out.append(mlp_case("steps_per_execution_4", steps=8, inject_step=4, steps_per_execution=4))
    # Optimizer options, two to a case to keep the file's time down.
    out.append(
        mlp_case(
            "adamw_lr_schedule_kernel_regularizers",
            lambda: keras.optimizers.AdamW(
                keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5),
                weight_decay=0.01,
            ),
            regularized=True,
        )
    )
    out.append(
        mlp_case(
            "sgd_nesterov_global_clipnorm_accumulation_2",
            lambda: keras.optimizers.SGD(
                0.01,
                momentum=0.9,
                nesterov=True,
                global_clipnorm=0.1,
                gradient_accumulation_steps=2,
            ),
        )
    )
    # Adafactor keeps int32 placeholder slots for 1-D weights (no statistics to take of them).
    out.append(mlp_case("adafactor", lambda: keras.optimizers.Adafactor(0.01)))
    return {c.name: c for c in out}


CASES = cases()

# Cases whose watched training is known to differ from plain fit's, with the measured
# difference and its cause (an xfail that may pass).  None today: ResNet50's (Grappler's memory
# optimizer, see device.flatten) is fixed, and test_application checks it.
KNOWN_DIFFERENT = {}


def within(path, layer):
    return path == layer or path.startswith(layer + "/")


def check_case(case, tmp_path):
    result = mm.run_case(case, tmp_path / case.name)
    model = result.watched_model
    labels = [summary.site_label(s) for s in result.sites]
    # (a) It ran, and watches the target layer, every variable's gradient and every optimizer's slots.
    assert result.watched.started == case.steps and result.plain.started == case.steps
    assert "%s/activation" % case.target in labels, labels
    kinds = {(s["layer"], s["kind"]) for s in result.sites}
    weight_grads = [s for s in result.sites if s["kind"] == "weight_grad"]
    assert len(weight_grads) == len(model.trainable_variables)
    for optimizer in case.optimizers(model):
        slot_variables = [
            v
            for v in optimizer.variables
            if v.path.split("/")[-1].startswith(
                tuple(n for n in ("momentum", "velocity", "accumulated", "average"))
            )
        ]
        slot_sites = [s for s in result.sites if s["kind"] == "optimizer_state"]
        assert len(slot_sites) >= len(slot_variables)
    # Weights are named by the layer that holds them (an RNN's cell, a wrapper's inner layer).
    assert any(k == "weight" and within(layer, case.target) for layer, k in kinds), kinds
    if case.cell_in_loop:
        # The RNN's cell runs in the layer's while_loop (and once outside it, for the output
        # shape): it is watched through its layer, never at that side computation.
        cell = "%s/%s" % (case.target, model.get_layer(case.target).cell.name)
        assert "%s/activation" % cell not in labels, labels
    # (c) The blow-up, named as the ground truth found it.
    step, layer = result.plain.truth
    assert (step, layer) == (case.inject_step, case.target), (
        "the ground truth does not see the injection"
    )
    first = result.first_nonfinite()
    assert first is not None, "nothing non-finite recorded"
    assert (first["step"], first["kind"]) == (step, case.expected_kind), first
    # The ground truth sees the model's own layers; the writer may name a layer inside one (an
    # unrolled RNN's cell, computed in the step's own graph).
    assert within(first["layer"], layer), (first["layer"], layer)
    if case.cell_in_loop:
        assert first["layer"] == layer
    assert first["nan"] > 0
    # (b) Training unchanged up to the injection.
    differ = mm.compare_bitwise(result.plain.snapshot, result.watched.snapshot)
    if differ:
        name, largest = max(differ, key=lambda d: -1 if d[1] is None else d[1])
        raise TrainingChanged(
            "after %d step(s), %d of %d variables differ; largest |difference| %.3g in %s; "
            "first: %s"
            % (case.inject_step, len(differ), len(result.plain.snapshot), largest, name, differ[0])
        )
    return result


def params(names):
    out = []
    for name in names:
        known = KNOWN_DIFFERENT.get(name)
        # Not strict: whether the memory optimizer's threshold is crossed varies from run to run
        # (the same code passed and failed at 32x32); a naming failure still fails the test.
        marks = (
            [pytest.mark.xfail(strict=False, raises=TrainingChanged, reason=known)] if known else []
        )
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", params(CASES))
def test_model(name, tmp_path):
    check_case(CASES[name], tmp_path)


# keras.applications at 32x32, weights=None: slow to trace, one test each (select with -m apps).
APPS = {
    "mobilenet_v2": (lambda: app(keras.applications.MobileNetV2, alpha=0.35), "block_3_expand"),
    "resnet50": (lambda: app(keras.applications.ResNet50), "conv3_block1_1_conv"),
    "efficientnet_b0": (lambda: app(keras.applications.EfficientNetB0), "block3a_expand_conv"),
}


@pytest.mark.apps
@pytest.mark.parametrize("name", params(APPS))
def test_application(name, tmp_path):
    build, target = APPS[name]
    x, y = images(2 * 2, (32, 32, 3), 10)
    check_case(
        mm.Case(name, build(), x, y, target=target, steps=2, inject_step=1, batch=2), tmp_path
    )


# ---------------------------------------------------------------------------------- misuse
@pytest.fixture
def watch_log():
    """The writer's log records (the CLI may have turned propagation to the root logger off)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("tb_nanwatch.watch")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def messages(records, text):
    return [r.getMessage() for r in records if text in r.getMessage()]


def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="head"),
        ]
    )


def test_watch_created_after_the_step_was_traced_warns_at_first_step_and_at_close(
    tmp_path, watch_log
):
    model, optimizer = small_model(), keras.optimizers.SGD(0.01)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    x, y = tf.constant(floats(8, 6)), tf.zeros((8, 1))
    train_step(x, y)  # traced before the Watch exists
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=1)
    text = "no training step was traced with the Watch in place"
    for step in range(3):
        train_step(x, y)
        assert watch.after_step() is False
        assert len(messages(watch_log, text)) == 1, "warned once, at the first after_step()"
    watch.close()
    at_close = messages(watch_log, text)
    assert len(at_close) == 2 and "closing" in at_close[1] and "after 3 step(s)" in at_close[1], (
        at_close
    )
    assert watch.sites == []


class ManualUpdate(keras.Model):
    """A train_step that updates the weights itself: model.optimizer.apply is never reached."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        for variable, grad in zip(self.trainable_variables, grads):
            variable.assign_sub(0.01 * grad)
        return {"loss": loss}


def test_train_step_without_optimizer_apply_warns_at_first_step_and_at_close(tmp_path, watch_log):
    base = small_model()
    model = ManualUpdate(base.inputs, base.outputs)
    model.compile(optimizer="sgd", loss="mse")
    before = model.get_layer("head").kernel.numpy().copy()

    class AtFirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                self.warned = len(messages(watch_log, "never called apply()"))

    at_first = AtFirstStep()
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=1)
    x = floats(4 * B, 6)
    model.fit(x, x[:, :1], batch_size=B, epochs=1, verbose=0, callbacks=[callback, at_first])
    # It trained (the manual update ran) and said, at the first step, why nothing is recorded.
    assert not np.array_equal(before, model.get_layer("head").kernel.numpy())
    assert at_first.warned == 1
    warned = messages(watch_log, "never called apply()")
    assert len(warned) == 2 and "closing" in warned[1] and "SGD" in warned[0], warned
    assert callback.watch.sites == []


def trace_counter():
    """A layer counting how often a training step is traced (a Python side effect at trace time)."""

    class Counted(keras.layers.Layer):
        traces = 0

        def call(self, x, training=None):
            if training:
                type(self).traces += 1
            return x

    return Counted(name="counted")


def fit_evaluate_fit(watched, tmp_path):
    keras.utils.set_random_seed(0)
    counted = trace_counter()
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh", name="hidden"),
            counted,
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = floats(4 * B, 6)
    callbacks = (
        [tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=2)] if watched else []
    )
    model.fit(x, x[:, :1], batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    first_fit = type(counted).traces
    evaluated = model.evaluate(x, x[:, :1], batch_size=B, verbose=0)
    model.fit(x, x[:, :1], batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model, first_fit, type(counted).traces, evaluated, callbacks


def test_second_fit_does_not_retrace_and_evaluate_between_fits(tmp_path):
    plain, plain_first, plain_total, plain_eval, _ = fit_evaluate_fit(False, tmp_path / "plain")
    model, first, total, evaluated, (callback,) = fit_evaluate_fit(True, tmp_path / "watched")
    # The callback traces no more than plain Keras (which traces twice when the optimizer builds
    # its slots inside the first trace; the callback builds them before); the second fit reuses
    # its function.
    assert 1 <= first <= plain_first
    assert total - first == plain_total - plain_first == 0
    # evaluate() between the fits ran none of our ops and gives plain Keras's number.
    assert evaluated == plain_eval
    for a, b in zip(plain.variables, model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Both fits are recorded: the rows go on where the first fit's stopped.
    provider, ctx, eid = reader.open_logdir(str(tmp_path / "watched"))
    run = reader.read_run(provider, ctx, eid, "run")
    assert run.steps.tolist()[-1] == 7 and 3 in run.steps.tolist()


# ------------------------------------------------------------------- the model after fit
CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["tb_nanwatch"] = None          # importing it would fail: the file must not need it
    import numpy as np, keras
    model = keras.models.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    y = np.load(sys.argv[3])
    print(json.dumps({"predict": model.predict(x, batch_size=8, verbose=0).tolist(),
                      "evaluate": model.evaluate(x, y, batch_size=8, verbose=0)}))
""")


def test_after_fit_evaluate_predict_save_and_load_elsewhere_give_plain_fits_numbers(tmp_path):
    x, y = images(4 * B, (8, 8, 3), 3)

    def trained(watched):
        keras.utils.set_random_seed(0)
        model = conv_bn()()
        callbacks = (
            [tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=2)] if watched else []
        )
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return model

    plain, watched = trained(False), trained(True)
    assert watched.evaluate(x, y, batch_size=B, verbose=0) == plain.evaluate(
        x, y, batch_size=B, verbose=0
    )
    np.testing.assert_array_equal(
        watched.predict(x, batch_size=B, verbose=0), plain.predict(x, batch_size=B, verbose=0)
    )
    path = str(tmp_path / "m.keras")
    watched.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(
        np.array(got["predict"], "float32"), plain.predict(x, batch_size=B, verbose=0)
    )
    assert got["evaluate"] == pytest.approx(plain.evaluate(x, y, batch_size=B, verbose=0), rel=1e-6)
