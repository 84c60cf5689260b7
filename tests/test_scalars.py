"""Per-row scalars in TensorBoard's own Scalars tab: the learning rate actually applied (a
schedule's value at that step), the loss, the global gradient norm and the loss scale, as
standard scalar summaries read back through TensorBoard's own data provider."""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as tb_multiplexer

import tb_nanwatch
from tb_nanwatch import reader

BATCH = 16


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("tb_nanwatch").setLevel(logging.ERROR)
    yield
    logging.getLogger("tb_nanwatch").setLevel(logging.NOTSET)


def tensorboard_scalars(logdir, run="run"):
    """{tag: {step: value}} as TensorBoard's Scalars tab reads them (its own loader)."""
    multiplexer = tb_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = tb_data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    ctx = tb_context.RequestContext()
    listed = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    data = provider.read_scalars(
        ctx, experiment_id="", plugin_name="scalars", downsample=10000, run_tag_filter=None
    )
    assert set(data[run]) == set(listed[run])
    return {tag: {d.step: d.value for d in points} for tag, points in data[run].items()}


def data(n=20 * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    return x, y


def mlp(optimizer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer, "mse")
    return model


def test_a_schedule_shows_its_value_at_each_logged_row(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    x, y = data()
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=3)
    mlp(keras.optimizers.SGD(schedule)).fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
    )
    scalars = tensorboard_scalars(tmp_path)
    rates = scalars["nanwatch/learning_rate"]
    # A row at step 0, every 3 steps, and the last: the rate applied at that very step.
    assert sorted(rates) == [0, 2, 5, 8, 11, 14, 17, 19]
    for step, value in rates.items():
        assert value == pytest.approx(float(schedule(step)), rel=1e-6), step
    assert rates[0] > rates[2] > rates[19] > 0  # the decay, not a constant
    # The rows and the scalars are written at the same steps.
    provider, ctx, eid = reader.open_logdir(str(tmp_path))
    assert reader.read_run(provider, ctx, eid, "run").steps.tolist() == sorted(rates)


def test_loss_and_gradient_norm_are_those_of_the_rows_step(tmp_path):
    # With a learning rate of 0 the weights stay put, so the loss and the gradient of every
    # step can be computed again afterwards, eagerly, without the writer.
    x, y = data()
    model = mlp(keras.optimizers.SGD(0.0))
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=5)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    scalars = tensorboard_scalars(tmp_path)
    assert "nanwatch/loss_scale" not in scalars  # no mixed precision, no loss scale
    assert scalars["nanwatch/learning_rate"][4] == 0.0
    for step in (0, 4, 9, 19):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        norm = float(tf.linalg.global_norm(grads))
        assert scalars["nanwatch/loss"][step] == pytest.approx(float(loss), rel=1e-5)
        assert scalars["nanwatch/gradient_norm"][step] == pytest.approx(norm, rel=1e-5)


def test_loss_scale_under_mixed_precision(tmp_path):
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x, y = data()
        model = mlp("adam")
        callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=5)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
        final_scale = float(model.optimizer.dynamic_scale.numpy())
    finally:
        keras.config.set_dtype_policy(previous)
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["nanwatch/loss_scale"][19] == final_scale
    assert scalars["nanwatch/learning_rate"][19] == pytest.approx(1e-3)
    # Gradients are reported without the loss scale: the same order as the loss's own.
    assert 0 < scalars["nanwatch/gradient_norm"][19] < 1e3


def test_tensorboards_scalars_tab_serves_them(tmp_path):
    """A real `tensorboard` (RustBoard, the default loader) serves the learning rate through
    its own Scalars plugin, while the NanWatch tab reads the same run."""
    import plugin_helpers as ph

    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([6], [0.05, 0.01])
    x, y = data()
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "logs" / "run"), log_every=4)
    mlp(keras.optimizers.SGD(schedule)).fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
    )
    with ph.tensorboard(tmp_path / "logs") as base:
        url = base + "/data/plugin/scalars/scalars?run=run&tag=nanwatch/learning_rate"

        def points():
            status, body = ph.get(url)
            return status == 200 and len(json.loads(body)) == 6 and json.loads(body)

        got = ph.wait_for(points, 60, what="the learning rate in the Scalars plugin")
        # Rows at steps 0, 3, 7, ...: the schedule drops from 0.05 to 0.01 after step 6.
        assert {int(step): value for _, step, value in got} == {
            0: pytest.approx(0.05),
            3: pytest.approx(0.05),
            7: pytest.approx(0.01),
            11: pytest.approx(0.01),
            15: pytest.approx(0.01),
            19: pytest.approx(0.01),
        }
        runs = ph.get_json(base + "/data/plugin/nanwatch/runs")
        assert "run" in json.dumps(runs)


def test_a_step_with_two_optimizers_logs_each_learning_rate(tmp_path):
    from test_models import gan  # keras.io's GAN: a d_optimizer and a g_optimizer

    model = gan()
    data = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=2)
    model.fit(data, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    rates = {
        tag: points[3]
        for tag, points in tensorboard_scalars(tmp_path).items()
        if tag.startswith("nanwatch/learning_rate/")
    }
    # model.optimizer (compile's default) is watched too, but never applies: no rate for it.
    names = [model.d_optimizer.name, model.g_optimizer.name]
    assert sorted(rates) == sorted("nanwatch/learning_rate/%s" % n for n in names), rates
    assert sorted(rates.values()) == [pytest.approx(1e-3), pytest.approx(1e-2)]


def test_scalar_tags_of_a_group_and_unknown_names(tmp_path):
    from tb_nanwatch import metadata, summary

    assert metadata.scalar_tag("loss", "encoder") == "nanwatch/encoder/loss"
    assert metadata.parse_tag("nanwatch/learning_rate") is None  # not a nanwatch record
    with pytest.raises(ValueError):
        metadata.scalar_tag("accuracy")
    sites = [summary.make_site("m", "loss")]
    with summary.RecordWriter(str(tmp_path / "run"), sites, group="encoder") as writer:
        writer.write_scalars(3, {"loss": 0.5, "learning_rate": 0.01})
        writer.write_scalars(7, {"loss": 0.25})
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["nanwatch/encoder/loss"] == {3: 0.5, 7: 0.25}
    assert scalars["nanwatch/encoder/learning_rate"] == {3: pytest.approx(0.01)}
