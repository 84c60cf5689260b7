"""A layer called several times in one step (a shared Dense, a tied embedding, a sub-model
applied to two inputs) has a site per call: the first call keeps the layer's name, later ones
are `name (call n)`, each at its place in the step.  Weights stay one site per variable."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch import heatmap, reader, stats, summary

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def shared_middle_shared(middle_kernel="identity", name="shared_twice"):
    """x -> shared -> middle -> shared: one Dense layer called twice in the step."""
    inputs = keras.Input((4,), name="x")
    shared = keras.layers.Dense(4, kernel_initializer="ones", name="shared")
    middle = keras.layers.Dense(4, kernel_initializer=middle_kernel, name="middle")
    return keras.Model(inputs, shared(middle(shared(inputs))), name=name)


def fit_once(tmp_path, model, x, run="run"):
    model.compile(optimizer="sgd", loss="mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / run), log_every=1)
    model.fit(x, np.zeros_like(x), batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    return callback.watch


def labels(sites, kind):
    return [s["layer"] for s in sites if s["kind"] == kind]


def cli_report(logdir, *options):
    proc = subprocess.run(
        [sys.executable, "-m", "tb_nanwatch.cli", "report", str(logdir), *options],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def test_overflow_between_two_calls_is_named_at_its_layer_not_the_shared_one(tmp_path):
    keras.utils.set_random_seed(0)
    # shared(1) = 4 per unit; middle's kernel of 1e38 makes 4 * 4 * 1e38 = +Inf.
    model = shared_middle_shared(keras.initializers.Constant(1e38))
    watch = fit_once(tmp_path, model, np.ones((8, 4), "float32"))
    # Execution order: forward, then backward call by call; weights once per variable.
    assert labels(watch.sites, "activation") == ["shared", "middle", "shared (call 2)"]
    assert labels(watch.sites, "activation_grad") == ["shared (call 2)", "middle", "shared"]
    assert labels(watch.sites, "weight") == ["shared"] * 2 + ["middle"] * 2
    assert labels(watch.sites, "weight_grad") == ["middle"] * 2 + ["shared"] * 2
    order = [summary.site_label(s) for s in watch.sites]
    # The shared kernel's gradient adds up both calls': it is complete after the last call's
    # backward pass (the first call's), not after the second call's.
    assert order.index("shared/weight_grad/kernel") > order.index("shared/activation_grad")
    first = watch.first_nonfinite
    assert (first["step"], first["layer"], first["kind"], first["posinf"]) == (
        0,
        "middle",
        "activation",
        32,
    )
    assert {"layer": "shared (call 2)", "kind": "activation"}.items() <= next(
        p for p in first["propagators"] if p["layer"] == "shared (call 2)"
    ).items()
    # What users read: the CLI's JSON and text, and the tab's tree, name the same site.
    runs = json.loads(cli_report(tmp_path, "--json"))["runs"]
    assert runs[0]["first_nonfinite"]["layer"] == "middle"
    assert "first non-finite at step 0 in middle, activation (+Inf 32)" in cli_report(tmp_path)


def test_a_later_call_that_overflows_is_named_with_its_call_number(tmp_path):
    keras.utils.set_random_seed(0)
    # 3e37 -> shared: 1.2e38 (finite) -> middle (identity): 1.2e38 -> shared again: 4.8e38 = +Inf.
    model = shared_middle_shared()
    watch = fit_once(tmp_path, model, np.full((8, 4), 3e37, "float32"))
    first = watch.first_nonfinite
    assert (first["layer"], first["kind"], first["posinf"]) == ("shared (call 2)", "activation", 32)
    on_disk = reader.first_nonfinite_json(
        reader.read_run(*reader.open_logdir(str(tmp_path)), "run")
    )
    assert (on_disk["layer"], on_disk["kind"]) == ("shared (call 2)", "activation")
    assert "in shared (call 2), activation (+Inf 32)" in cli_report(tmp_path)
    # The first call's site measured only the first call: 8 x 4 elements, all finite.
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "run")
    col = stats.STAT_INDEX
    call1 = rd.site_index("shared", "activation")
    assert rd.rows[0, call1, col["size"]] == 8 * 4
    assert rd.rows[0, call1, col["posinf"]] == 0
    np.testing.assert_allclose(rd.rows[0, call1, col["max_abs"]], 1.2e38, rtol=1e-6)
    # The tab's tree: the second call is a row of its own, after `middle`, as it ran.
    tree = heatmap.layer_tree(rd.sites, np.arange(len(rd.sites)))
    rows = [n.name for n in tree.nodes if n.level == "layer"]
    assert rows.index("shared") < rows.index("middle") < rows.index("shared (call 2)")
    call2 = next(n for n in tree.nodes if n.level == "layer" and n.name == "shared (call 2)")
    kinds = {rd.sites[i]["kind"] for i in tree.order[call2.start : call2.end]}
    assert kinds == {"activation", "activation_grad"}


def test_activation_gradients_are_per_call_in_backward_order(tmp_path):
    """A gradient that overflows on its way back through the second call's weights is the
    gradient w.r.t. `middle`'s output, computed by `shared (call 2)`'s backward pass."""
    keras.utils.set_random_seed(0)
    model = shared_middle_shared()
    optimizer = keras.optimizers.SGD(0.0)
    watch = tb_nanwatch.Watch(str(tmp_path / "run"), model, optimizer, log_every=1)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            # d loss / d output = 3e38 (finite); through `shared`'s kernel of ones, 4 * 3e38 = +Inf.
            loss = watch.record_loss(tf.reduce_sum(model(x, training=True)) * 3e38)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    train_step(tf.zeros((8, 4)))
    watch.after_step()
    watch.close()
    first = watch.first_nonfinite
    assert (first["layer"], first["kind"], first["posinf"]) == ("middle", "activation_grad", 32)
    assert first["backward_of"] == ["shared (call 2)"]
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "run")
    col = stats.STAT_INDEX
    call2 = rd.site_index("shared (call 2)", "activation_grad")
    np.testing.assert_allclose(rd.rows[0, call2, col["max_abs"]], 3e38, rtol=1e-6)
    assert rd.rows[0, call2, col["size"]] == 8 * 4  # its own call's gradient, not both calls'
    assert rd.rows[0, rd.site_index("shared", "activation_grad"), col["nan"]] > 0


def test_sub_model_called_twice_names_its_layers_under_the_call(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="dense")], name="encoder"
    )
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    out = keras.layers.Subtract(name="diff")([encoder(a), encoder(b)])
    model = keras.Model({"a": a, "b": b}, out, name="siamese")
    model.compile(optimizer="sgd", loss="mse")
    x = {"a": np.ones((8, 4), "float32"), "b": np.zeros((8, 4), "float32")}
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=1)
    model.fit(x, np.zeros((8, 3), "float32"), batch_size=8, verbose=0, callbacks=[callback])
    sites = callback.watch.sites
    assert labels(sites, "activation") == [
        "encoder/dense",
        "encoder",
        "encoder (call 2)/dense",
        "encoder (call 2)",
        "diff",
    ]
    assert labels(sites, "weight") == ["encoder/dense"] * 2
    tree = heatmap.layer_tree(sites, np.arange(len(sites)))
    groups = [n.name for n in tree.nodes if n.level == "group"]
    assert groups == ["encoder", "encoder (call 2)"]


def test_names_stay_the_same_when_the_step_is_traced_again(tmp_path):
    """A second fit() with another batch size traces the step again: the same calls feed the
    same sites."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    h = inputs
    for _ in range(3):
        h = shared(h)
    model = keras.Model(inputs, h)
    model.compile(optimizer="sgd", loss="mse")
    callback = tb_nanwatch.NanWatchCallback(str(tmp_path / "run"), log_every=1)
    x = np.ones((12, 4), "float32")
    model.fit(x, x, batch_size=4, verbose=0, callbacks=[callback])
    before = callback.watch.sites
    model.fit(x, x, batch_size=6, verbose=0, callbacks=[callback])
    assert callback.watch.sites == before
    assert labels(before, "activation") == ["shared", "shared (call 2)", "shared (call 3)"]
    rd = reader.read_run(*reader.open_logdir(str(tmp_path)), "run")
    sizes = rd.rows[-1, :, stats.STAT_INDEX["size"]]
    for call in ("shared", "shared (call 2)", "shared (call 3)"):
        assert sizes[rd.site_index(call, "activation")] == 6 * 4, call
        assert sizes[rd.site_index(call, "activation_grad")] == 6 * 4, call
