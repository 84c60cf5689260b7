"""Replay: the bundle's step run again eagerly names the op and its source line, and tells a
reproducible blow-up from a transient one."""

import inspect
import os

import numpy as np
import pytest
import stop_scenarios as sc

import tb_nanwatch
from tb_nanwatch import replay_step as replay_module

HERE = os.path.dirname(os.path.abspath(__file__))


def stopped_run(scenario, logdir, jit_compile=False):
    build, x, y, loss, make_optimizer, _ = scenario()
    model = build()
    model.compile(optimizer=make_optimizer(), loss=loss, jit_compile=jit_compile)
    cb = tb_nanwatch.NanWatchCallback(str(logdir), on_nonfinite="stop")
    model.fit(x, y, batch_size=sc.BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    return model, cb.watch.first_nonfinite


def test_log_of_zero_is_reproducible_with_its_op_and_line(tmp_path):
    model, record = stopped_run(sc.log_of_zero, tmp_path)
    before = [v.numpy() for v in model.variables]
    # model=None: the bundle's architecture, deserialised with safe_mode on.
    result = tb_nanwatch.replay(tmp_path).as_json()
    assert result["step"] == record["step"] == 4
    assert (result["verdict"], result["reproduced"]) == ("reproducible", True)
    assert result["site"] == {"layer": "log_features", "kind": "activation", "tensor": ""}
    lines, start = inspect.getsourcelines(sc.LogFeatures.call)
    line = start + next(i for i, text in enumerate(lines) if "tf.math.log" in text)
    assert result["op"]["type"] == "Log"
    assert result["op"]["source"] == {
        "file": os.path.join(HERE, "stop_scenarios.py"),
        "line": line,
        "function": "call",
    }
    # domain_error's remedy is a change to the layer's code: not applied, and said why; the
    # usual guesses change the update, which comes after the forward pass that went non-finite:
    # a replay of this step cannot test them, and says so instead of "did not hold".
    assert result["remedies"][0] == {
        "cause": "domain_error",
        "remedy": None,
        "applied": False,
        "finite_after": None,
        "why": replay_module.NOT_MECHANICAL,
    }
    assert result["remedies"][1:] == [
        {
            "cause": None,
            "remedy": words,
            "applied": False,
            "finite_after": None,
            "why": replay_module.FORWARD_FAILURE,
        }
        for words in ("clip the gradients (global_clipnorm=1.0)", "lower the learning rate 10x")
    ]
    # Replaying with the user's model leaves it as the bundle had it, optimizer settings included.
    assert tb_nanwatch.replay(tmp_path, model=model).verdict == "reproducible"
    for a, b in zip(model.variables, before):
        np.testing.assert_array_equal(a.numpy(), b)
    assert model.optimizer.global_clipnorm is None
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_a_nan_input_is_located_in_the_batch(tmp_path):
    stopped_run(sc.nan_input_row, tmp_path)
    result = tb_nanwatch.replay(tmp_path).as_json()
    assert result["verdict"] == "reproducible" and result["site"]["kind"] == "input"
    assert result["op"] is None
    assert result["input"] == [{"name": "x", "rows": [5], "elements": [[5, 2]], "count": 1}]


def test_a_nan_label_is_reproducible_at_the_target_site(tmp_path):
    """The replay checks the targets as the Watch does: before the forward pass, at the target
    site, and locates the label in the batch (it was 'not reproducible' at the loss before)."""

    def nan_label_row():
        build, x, y, loss, make_optimizer, _ = sc.nan_input_row()
        x = np.nan_to_num(x)
        y = y.copy()
        y[3 * sc.BATCH + 1, 0] = np.nan
        return build, x, y, loss, make_optimizer, 3

    model, record = stopped_run(nan_label_row, tmp_path)
    assert (record["step"], record["kind"]) == (3, "target")
    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    assert result["verdict"] == "reproducible"
    assert result["site"] == {"layer": "model", "kind": "target", "tensor": ""}
    assert result["input"] == [{"name": "y", "rows": [1], "elements": [[1, 0]], "count": 1}]


def test_adam_slot_overflow_is_reproducible(tmp_path):
    stopped_run(sc.adam_slot_overflow, tmp_path)
    result = tb_nanwatch.replay(tmp_path).as_json()
    assert result["verdict"] == "reproducible"
    assert (result["site"]["kind"], result["site"]["tensor"]) == (
        "optimizer_state",
        "velocity/kernel",
    )
    assert result["op"]["type"] is not None


def test_a_transient_fault_is_not_reproducible(tmp_path):
    model, record = stopped_run(sc.transient_fault, tmp_path)
    assert (record["step"], record["layer"], record["kind"]) == (0, "flaky", "activation")
    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    assert (result["verdict"], result["reproduced"]) == ("not_reproducible", False)
    assert result["site"] is None and result["op"] is None


def test_replay_errors_are_clear(tmp_path):
    with pytest.raises(tb_nanwatch.BundleError, match="no repro bundle"):
        tb_nanwatch.replay(tmp_path)
    stopped_run(sc.log_of_zero, tmp_path)
    other = sc.nan_input_row()[0]()
    other.compile(optimizer="adam", loss="mse")
    with pytest.raises(
        replay_module.ReplayError,
        match=r"model/hidden/kernel has shape \(6, 8\), the bundle.s \(4, 4\)",
    ):
        tb_nanwatch.replay(tmp_path, model=other)
    # A model whose train_step computes its own loss: compile() has none to replay.
    build, _, _, _, make_optimizer, _ = sc.log_of_zero()
    own_loss = build()
    own_loss.compile(optimizer=make_optimizer())
    with pytest.raises(replay_module.ReplayError, match="no compiled loss"):
        tb_nanwatch.replay(tmp_path, model=own_loss)


def test_a_gradient_op_is_traced_back_to_the_forward_op_the_user_wrote(tmp_path):
    model, record = stopped_run(sc.sqrt_gradient_at_zero, tmp_path)
    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    assert result["verdict"] == "reproducible"
    assert result["site"] == {"layer": "hidden", "kind": "activation_grad", "tensor": ""}
    assert result["op"]["type"] == "SqrtGrad" and result["op"]["source"] is None
    lines, start = inspect.getsourcelines(sc.SqrtAbs.call)
    line = start + next(i for i, text in enumerate(lines) if "tf.sqrt" in text)
    assert result["op"]["forward"] == {
        "type": "Sqrt",
        "layer": "sqrt_abs",
        "source": {
            "file": os.path.join(HERE, "stop_scenarios.py"),
            "line": line,
            "function": "call",
        },
    }


def test_a_float16_overflow_read_as_a_domain_error_is_ranked_by_the_replay(tmp_path):
    """exp overflows in a float16 layer; inf / inf leaves only NaN in the logs.  The op
    inventory (Exp in the layer) already names the overflow; without it the logs read as a
    domain error, and the replay, which sees Exp output +Inf in float16 and tries the layer in
    float32 (it holds), ranks reduced_precision_overflow first."""
    from tb_nanwatch import diagnosis, runview

    model, record = stopped_run(sc.float16_exp_overflow, tmp_path)
    assert (record["layer"], record["nan"], record["posinf"]) == ("exp_normalise", 3, 0)
    with_inventory = diagnosis.diagnose(runview.from_files("run", tmp_path))
    assert [d["cause"] for d in with_inventory] == ["reduced_precision_overflow"]
    assert "computes Exp" in with_inventory[0]["evidence"]
    inventory = tmp_path / "nanwatch_ops.json"
    inventory.rename(tmp_path / "ops.json.away")  # logs of a run without the op inventory
    before_replay = diagnosis.diagnose(runview.from_files("run", tmp_path))
    assert [d["cause"] for d in before_replay] == ["domain_error"]
    weights = [v.numpy() for v in model.variables]

    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    assert result["verdict"] == "reproducible"
    assert (result["op"]["type"], result["op"]["dtype"], result["op"]["values"]) == (
        "Exp",
        "float16",
        ["+Inf"],
    )
    assert result["remedies"][0] == {
        "cause": "reduced_precision_overflow",
        "remedy": "compute the layer in float32 (its variables keep their dtype)",
        "applied": True,
        "finite_after": True,
    }
    assert model.get_layer("exp_normalise").dtype_policy.compute_dtype == "float16"
    for a, b in zip(model.variables, weights):
        np.testing.assert_array_equal(a.numpy(), b)

    ranked = diagnosis.diagnose(runview.from_files("run", tmp_path))
    assert [d["cause"] for d in ranked] == ["reduced_precision_overflow", "domain_error"]
    assert "op Exp at stop_scenarios.py" in ranked[0]["evidence"]
    assert (
        "compute the layer in float32 (its variables keep their dtype) made the step finite"
        in (ranked[0]["evidence"])
    )
    assert ranked[1]["score"] < before_replay[0]["score"]
    # A replay of another step says nothing about this one.
    stale = dict(result, step=result["step"] + 1)
    assert diagnosis.diagnose(runview.from_files("run", tmp_path), replay=stale) == before_replay
    (tmp_path / "ops.json.away").rename(inventory)
    both = diagnosis.diagnose(runview.from_files("run", tmp_path))
    assert [d["cause"] for d in both] == ["reduced_precision_overflow"]
    assert both[0]["score"] >= with_inventory[0]["score"]


def test_a_float16_kernel_gradient_overflow_stays_reduced_precision_overflow(tmp_path):
    """The float16 Dense's kernel gradient overflows: computing the layer in float32 does not
    hold (the gradient is still float16, the kernel's dtype) and the trial says where it went
    non-finite; the overflow seen on the op keeps reduced_precision_overflow first."""
    from tb_nanwatch import diagnosis, runview

    model, record = stopped_run(sc.float16_overflow, tmp_path)
    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    float32 = next(r for r in result["remedies"] if r["cause"] == "reduced_precision_overflow")
    assert (float32["applied"], float32["finite_after"]) == (True, False)
    assert float32["nonfinite_at"] == {
        "layer": "big_init",
        "kind": "weight_grad",
        "tensor": "kernel",
    }
    standardise = next(r for r in result["remedies"] if r["cause"] == "unscaled_inputs")
    assert standardise["remedy"] == "standardise the inputs"
    if record["step"]:  # weights already fit to the raw inputs: this batch alone tests nothing
        assert not standardise["applied"] and "trained on the unscaled inputs" in standardise["why"]
    else:
        assert standardise["applied"]
    ranked = diagnosis.diagnose(runview.from_files("run", tmp_path))
    assert ranked[0]["cause"] == "reduced_precision_overflow"
    assert "did not make the step finite" in ranked[0]["evidence"]


def test_the_optimizer_remedies_undo_what_they_change():
    """epsilon 1e-7 applies only where it is 0, and each trial's undo puts back what it set."""
    import keras

    adam = keras.optimizers.Adam(1e-3, epsilon=0.0)
    undo = replay_module._adam_epsilon({"optimizer": adam})
    assert adam.epsilon == 1e-7
    undo()
    assert adam.epsilon == 0.0
    assert replay_module._adam_epsilon({"optimizer": keras.optimizers.Adam()}) == (
        "epsilon is already 1e-07"
    )
    undo = replay_module._lower_learning_rate({"optimizer": adam})
    assert float(adam.learning_rate) == pytest.approx(1e-4)
    undo()
    assert float(adam.learning_rate) == pytest.approx(1e-3)
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)
    assert "schedule" in replay_module._lower_learning_rate(
        {"optimizer": keras.optimizers.SGD(schedule)}
    )
    adam.clipnorm = 2.0
    undo = replay_module._clip_values({"optimizer": adam})
    assert (adam.clipvalue, adam.clipnorm, adam.global_clipnorm) == (1.0, None, None)
    undo()
    assert (adam.clipvalue, adam.clipnorm, adam.global_clipnorm) == (None, 2.0, None)


def test_every_layer_in_float32_is_tried_and_undone():
    """The model-wide float32 trial sets every half-precision layer to float32 and leaves every
    policy as it was."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="first", dtype="mixed_float16"),
            keras.layers.Dense(1, name="second", dtype="mixed_float16"),
        ]
    )
    undo = replay_module._model_in_float32({"model": model})
    assert [layer.dtype_policy.compute_dtype for layer in model.layers] == ["float32"] * 2
    undo()
    assert [layer.dtype_policy.name for layer in model.layers] == ["mixed_float16"] * 2
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    assert "no layer computes in float16" in replay_module._model_in_float32({"model": plain})


def test_a_recurrent_cell_is_replayed_as_the_layer_the_watch_names(tmp_path):
    """The Watch sees an RNN cell through its layer (the cell runs in the layer's loop); the
    eager replay sees the cell's own calls.  The same site, reproducible."""
    import keras

    def exploding_irnn():
        rng = np.random.default_rng(2)
        x = np.abs(rng.normal(size=(64, 300, 2))).astype("float32")
        y = rng.normal(size=(64, 1)).astype("float32")

        def build():
            keras.utils.set_random_seed(0)
            return keras.Sequential(
                [
                    keras.Input((300, 2)),
                    keras.layers.SimpleRNN(
                        8,
                        activation="relu",
                        recurrent_initializer=keras.initializers.Identity(gain=1.5),
                        name="rnn",
                    ),
                    keras.layers.Dense(1, name="head"),
                ],
                name="model",
            )

        return build, x, y, "mse", lambda: keras.optimizers.SGD(1e-3), 0

    model, record = stopped_run(exploding_irnn, tmp_path)
    assert (record["layer"], record["kind"]) == ("rnn", "activation")
    result = tb_nanwatch.replay(tmp_path, model=model).as_json()
    assert result["verdict"] == "reproducible"
    assert result["site"] == {"layer": "rnn", "kind": "activation", "tensor": ""}
