"""Replay: run a repro bundle's step again, eagerly, and name the op that goes non-finite.

    result = tb_nanwatch.replay("logs/run1")            # the bundle's serialised model
    result = tb_nanwatch.replay("logs/run1", model=m)   # or your own (custom layers, subclasses)
    result.as_json()  # step, reproduced, verdict, site, op {type, name, source}, input, remedies

The bundle's state (weights and optimizer variables from before the step) is restored into
the model, and the step runs once more eagerly, like Keras's `train_step`: forward, loss,
gradients, the optimizer's update.  Pass 1 checks every site in the Watch's execution order
(input, each layer's output, loss, the gradient at each layer's output and its weights', each
optimizer slot and weight) and finds the first non-finite one.  Pass 2 restores the state again
and reruns the step under `tf.debugging.enable_check_numerics()`, which stops at the first op
whose output is not finite: its type, name and the user's source line.

Verdict: "reproducible" when the replay's first site is the recorded one; "not_reproducible"
when the replay stays finite (a transient fault: hardware, a race, state outside the model);
"xla_only" when the run was compiled with XLA, eager stays finite, and the same step compiled
again does go non-finite.  A replay that goes non-finite at another site is not "reproduced".
"""

import json
import logging
import re

import numpy as np

from tb_nanwatch import bundle as bundle_module

logger = logging.getLogger("tb_nanwatch.replay")


class ReplayError(Exception):
    """The bundle cannot be replayed (no model, a model that does not match the bundle)."""


class ReplayResult:
    def __init__(self, step, verdict, reproduced, site, op, input_location, recorded, notes):
        self.step = step
        self.verdict = verdict
        self.reproduced = reproduced
        self.site = site
        self.op = op
        self.input = input_location
        self.recorded = recorded
        self.remedies = []
        self.notes = notes

    def as_json(self):
        return {
            "step": self.step,
            "reproduced": self.reproduced,
            "verdict": self.verdict,
            "site": self.site,
            "op": self.op,
            "input": self.input,
            "recorded": self.recorded,
            "remedies": list(self.remedies),
            "notes": list(self.notes),
        }

    def __repr__(self):
        return "ReplayResult(%s)" % json.dumps(self.as_json())


def _unflatten(batch, prefix):
    """The structure named `prefix`, `prefix/0`, `prefix/key` ... rebuilt from the flat batch."""
    if prefix in batch:
        return batch[prefix]
    children = {}
    for name, value in batch.items():
        if name.startswith(prefix + "/"):
            head, _, rest = name[len(prefix) + 1 :].partition("/")
            children.setdefault(head, []).append(rest)
    if not children:
        return None
    if all(k.isdigit() for k in children):
        return tuple(_unflatten(batch, "%s/%s" % (prefix, k)) for k in sorted(children, key=int))
    return {k: _unflatten(batch, "%s/%s" % (prefix, k)) for k in children}


def _nonfinite(value):
    import tensorflow as tf

    if value is None:
        return False
    if isinstance(value, tf.IndexedSlices):
        value = value.values
    value = tf.convert_to_tensor(value)
    if not value.dtype.is_floating:
        return False
    return not bool(tf.reduce_all(tf.math.is_finite(value)))


def _input_location(batch):
    """Where the batch is not finite: per input, the rows and the first element indices."""
    out = []
    for name, array in batch.items():
        array = np.asarray(array)
        if array.dtype.kind != "f":
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            where = np.argwhere(bad)
            out.append(
                {
                    "name": name,
                    "rows": sorted({int(i) for i in where[:, 0]}) if array.ndim else [],
                    "elements": [[int(i) for i in w] for w in where[:8]],
                    "count": int(bad.sum()),
                }
            )
    return out


def _restore(model, optimizer, loaded):
    weights = list(loaded.weights.values())
    variables = list(model.variables)
    if len(weights) != len(variables):
        raise ReplayError(
            "the model has %d variables, the bundle %d: pass the model the run trained"
            % (len(variables), len(weights))
        )
    for variable, value in zip(variables, weights):
        if tuple(variable.shape) != tuple(value.shape):
            raise ReplayError(
                "variable %s has shape %s, the bundle's %s"
                % (variable.path, tuple(variable.shape), value.shape)
            )
        variable.assign(value.astype(variable.dtype))
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    slots = list(loaded.optimizer_variables.values())
    opt_variables = list(optimizer.variables)
    if len(slots) != len(opt_variables):
        raise ReplayError(
            "the optimizer has %d variables, the bundle %d" % (len(opt_variables), len(slots))
        )
    for variable, value in zip(opt_variables, slots):
        variable.assign(np.asarray(value).astype(variable.dtype))


class _LayerHooks:
    """Wraps every layer's call (eager): each output, in completion order, and the layers
    running when an error is raised."""

    def __init__(self, model):
        from tb_nanwatch.watch import sites

        self.layers = sites.layer_paths(model)
        self.outputs = []  # (path, tensor)
        self.running = []
        self.failed_in = None
        self._saved = []

    def __enter__(self):
        import functools

        for path, layer in self.layers:
            original = layer.call
            had_own = "call" in vars(layer)

            def call(*args, _original=original, _path=path, **kwargs):
                self.running.append(_path)
                try:
                    out = _original(*args, **kwargs)
                except Exception:
                    if self.failed_in is None:
                        self.failed_in = list(self.running)
                    raise
                finally:
                    self.running.pop()
                for t in _float_tensors(out):
                    self.outputs.append((_path, t))
                return out

            functools.update_wrapper(call, original)
            object.__setattr__(layer, "call", call)
            self._saved.append((layer, had_own, original))
        return self

    def __exit__(self, *exc):
        for layer, had_own, original in reversed(self._saved):
            if had_own:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


def _float_tensors(structure):
    import tensorflow as tf

    return [
        t for t in tf.nest.flatten(structure) if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]


def _step(model, optimizer, x, y, sample_weight, hooks, check):
    """One training step, eagerly, as Keras's train_step; `check(site)` is called on each site
    in the Watch's execution order and returns True to stop there."""
    import tensorflow as tf

    name = model.name
    x, y, sample_weight = (
        None if part is None else tf.nest.map_structure(tf.convert_to_tensor, part)
        for part in (x, y, sample_weight)
    )
    if any(_nonfinite(t) for t in _float_tensors(x)) and check((name, "input", "")):
        return
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        loss = optimizer.scale_loss(loss)
    seen = []
    for path, t in hooks.outputs:
        if path not in seen:
            seen.append(path)
    for path in seen:
        if any(_nonfinite(t) for p, t in hooks.outputs if p == path) and check(
            (path, "activation", "")
        ):
            return
    if _nonfinite(loss) and check((name, "loss", "")):
        return
    weights = list(model.trainable_variables)
    outputs = [t for _, t in hooks.outputs]
    grads = tape.gradient(loss, outputs + weights)
    out_grads, weight_grads = grads[: len(outputs)], grads[len(outputs) :]
    owner = {}
    for path, layer in hooks.layers:
        for v in getattr(layer, "_trainable_variables", []):
            owner.setdefault(id(v), path)
    placed = set()
    for path in reversed(seen):
        if any(_nonfinite(g) for (p, _), g in zip(hooks.outputs, out_grads) if p == path) and check(
            (path, "activation_grad", "")
        ):
            return
        for v, g in zip(weights, weight_grads):
            if owner.get(id(v)) == path and id(v) not in placed:
                placed.add(id(v))
                if _nonfinite(g) and check((path, "weight_grad", v.name)):
                    return
    for v, g in zip(weights, weight_grads):
        if (
            id(v) not in placed
            and _nonfinite(g)
            and check((owner.get(id(v), name), "weight_grad", v.name))
        ):
            return
    optimizer.apply(weight_grads, weights)
    from tb_nanwatch.watch import flavour as flavours

    per_variable = flavours.of_optimizer(optimizer).variable_slots(optimizer, weights)
    for v, slots in zip(weights, per_variable):
        path = owner.get(id(v), name)
        for slot_name, slot in slots:
            if (
                slot is not None
                and _nonfinite(slot)
                and check((path, "optimizer_state", "%s/%s" % (slot_name, v.name)))
            ):
                return
        if _nonfinite(v) and check((path, "weight", v.name)):
            return


_OP_TYPE = re.compile(r'eagerly-executing op "([^"]+)"|op "([^"]+)"|Op:(\w+)')


def _first_op(model, optimizer, loaded, x, y, sample_weight):
    """Pass 2: the first op whose output is not finite, with the user's source line."""
    import tensorflow as tf

    from tb_nanwatch.watch import sources

    _restore(model, optimizer, loaded)
    hooks = _LayerHooks(model)
    tf.debugging.enable_check_numerics()
    try:
        with hooks:
            _step(model, optimizer, x, y, sample_weight, hooks, lambda site: False)
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as error:
        message = str(error)
        match = _OP_TYPE.search(message)
        op_type = next((g for g in match.groups() if g), None) if match else None
        name = re.search(r"op name: ([^\s]+)", message)
        import traceback

        frames = traceback.extract_tb(error.__traceback__)
        user = [f for f in frames if sources.is_user_frame(f.filename)]
        source = (
            {"file": user[-1].filename, "line": user[-1].lineno, "function": user[-1].name}
            if user
            else None
        )
        return {
            "type": op_type,
            "name": name.group(1) if name else None,
            "source": source,
            "layer": hooks.failed_in[-1] if hooks.failed_in else None,
        }
    finally:
        tf.debugging.disable_check_numerics()
    return None


def _forward_op(run_dir, op_type):
    """For a gradient op with no user frame (`SqrtGrad`), the forward op it differentiates and
    where the user's code created it, from the run's nanwatch_ops.json; None if not found."""
    from tb_nanwatch import op_sources

    if not op_type or not op_type.endswith("Grad"):
        return None
    forward_type = op_type[: -len("Grad")]
    try:
        record = op_sources.read_op_sources(run_dir)
    except op_sources.OpSourcesError:
        return None
    for layer, entry in (record or {}).get("layers", {}).items():
        for op in entry["ops"]:
            if op["type"] == forward_type and op.get("source"):
                return {"type": forward_type, "layer": layer, "source": op["source"][-1]}
    return None


def _load_model(loaded, model, custom_objects):
    if model is not None:
        return model
    if not loaded.architecture:
        raise ReplayError(
            "the bundle at %s holds no architecture (the model did not serialise): pass model="
            % loaded.path
        )
    import keras

    model = keras.saving.deserialize_keras_object(
        json.loads(loaded.architecture), custom_objects=custom_objects, safe_mode=True
    )
    if getattr(model, "optimizer", None) is None:
        raise ReplayError(
            "the serialised model in %s has no optimizer (it was not compiled): pass model="
            % loaded.path
        )
    return model


def _xla_reproduces(model, optimizer, loaded, x, y, sample_weight):
    """The same step compiled with XLA: does any loss or variable go non-finite?"""
    import tensorflow as tf

    _restore(model, optimizer, loaded)

    @tf.function(jit_compile=True)
    def compiled_step():
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    loss = compiled_step()
    return _nonfinite(loss) or any(_nonfinite(v) for v in model.variables + optimizer.variables)


def replay(run_dir, model=None, custom_objects=None):
    """Replays the repro bundle of `run_dir` (see the module's docstring); a `ReplayResult`."""
    loaded = bundle_module.load_bundle(run_dir)
    model = _load_model(loaded, model, custom_objects)
    optimizer = model.optimizer
    if optimizer is None:
        raise ReplayError("the model has no optimizer: compile it as the run did")
    notes = list(loaded.notes)
    if not loaded.batch:
        raise ReplayError("the bundle at %s holds no batch: %s" % (loaded.path, "; ".join(notes)))
    batch = {k: v for k, v in loaded.batch.items()}
    x, y, sample_weight = (
        _unflatten(batch, "x"),
        _unflatten(batch, "y"),
        _unflatten(batch, "sample_weight"),
    )
    recorded = loaded.first_nonfinite
    _restore(model, optimizer, loaded)
    found = []
    hooks = _LayerHooks(model)
    with hooks:
        _step(model, optimizer, x, y, sample_weight, hooks, lambda site: found.append(site) or True)
    site = None
    if found:
        layer, kind, tensor = found[0]
        site = {"layer": layer, "kind": kind, "tensor": tensor}
    reproduced = bool(
        site
        and recorded
        and (site["layer"], site["kind"], site["tensor"] or "")
        == (recorded.get("layer"), recorded.get("kind"), recorded.get("tensor") or "")
    )
    op, input_location = None, None
    if site is not None and site["kind"] == "input":
        input_location = _input_location(batch)
    elif site is not None:
        op = _first_op(model, optimizer, loaded, x, y, sample_weight)
        if op is not None and op["source"] is None:
            op["forward"] = _forward_op(run_dir, op["type"])
    if reproduced:
        verdict = "reproducible"
    elif (
        site is None
        and loaded.jit_compile
        and _xla_reproduces(model, optimizer, loaded, x, y, sample_weight)
    ):
        verdict = "xla_only"
    else:
        verdict = "not_reproducible"
        if site is not None:
            notes.append(
                "the replay went non-finite at another site (%s, %s) than the run"
                % (site["layer"], site["kind"])
            )
    _restore(model, optimizer, loaded)  # leave the model as the bundle had it
    result = ReplayResult(
        loaded.step, verdict, reproduced, site, op, input_location, recorded, notes
    )
    try:  # kept beside the run's records: the report and the tab say what the replay found
        from tb_nanwatch import failing_step

        failing_step.write_replay(run_dir, result.as_json())
    except OSError as e:
        result.notes.append("the result could not be kept in %s: %s" % (run_dir, e))
    return result
