"""Wrapping a Keras model and its optimizers so a traced train step reports its tensors.

Layer `call`s, `compute_loss`, `train_step` and every watched optimizer's
`apply` are wrapped *before* the train function is traced; the wrappers are
plain Python at trace time and collect the step's tensors into a `StepTrace`.

A layer's call that runs inside a nested graph of the step (an RNN cell inside
the `while_loop` of its layer, a branch of `tf.cond`, `map_fn`) is not
recorded: its tensors cannot be read from the step's graph.  Its outermost
layer whose outputs return into the step is watched instead.
"""

import functools
import logging
import threading

import tensorflow as tf

from tb_nanwatch.watch import flavour as flavours
from tb_nanwatch.watch import guard
from tb_nanwatch.watch import sites as site_catalogue

logger = logging.getLogger("tb_nanwatch.watch")


class StepTrace:
    """Tensors of one traced training step, gathered as the step's Python code runs."""

    def __init__(self, graph, in_train_step=False):
        self.graph = graph  # the (function) graph the step is traced in
        self.in_train_step = in_train_step  # ends when the wrapped train_step returns
        self.inputs = []
        self.targets = []  # (name, tensor) per float leaf of y
        self.sample_weights = []  # (name, tensor) per float leaf of sample_weight
        # Keyed by call (`sites.call_name`): a layer called twice in the step has two entries.
        self.activations = {}  # call -> [tensor], forward completion order
        self.activation_grads = {}  # call -> [tensor], backward order
        self.losses = []
        self.applies = []  # (optimizer, grads, variables) per optimizer.apply
        self.learning_rates = []  # per apply, the learning rate it applies (a tensor), or None
        self.produced_by = {}  # id(output tensor) -> call
        self.consumers = {}  # call -> [calls of layers that took its output]
        self.nested = set()  # paths of layers called inside a nested graph
        self.layer_of = {}  # call -> the layer's path
        self._calls = {}  # call name without its number -> calls so far
        self._active = []  # (path, call) of the layer calls in progress, outermost first
        self.snapshots = None  # stop mode: guard.Snapshots of the variables the step may write
        self.batch = []  # stop mode: [(name, tensor)] of the data the step consumed
        self.layer_ops = []  # (layer path, first op index, end op index), calls in completion order
        self.own_ops = []  # (first, end) op indices of the gradient probes tb_nanwatch added

    def begin_call(self, path):
        """The name of a new call of the layer at `path` in this step (`sites.call_name`).  A
        layer inside a repeated call is named under that call: the second call of a sub-model
        `encoder` runs `encoder (call 2)/dense`, as its first runs `encoder/dense`."""
        parent, _, name = path.rpartition("/")
        for active_path, active_call in reversed(self._active):
            if active_path == parent:
                parent = active_call
                break
        base = parent + "/" + name if parent else name
        n = self._calls[base] = self._calls.get(base, 0) + 1
        call = site_catalogue.call_name(base, n)
        self.layer_of[call] = path
        self._active.append((path, call))
        return call

    def end_call(self):
        self._active.pop()


def _current_graph():
    return tf.compat.v1.get_default_graph()


def _inside(graph, outer):
    """Whether `graph` is a function graph nested in `outer` (a while body, a cond branch)."""
    graph = getattr(graph, "outer_graph", None)
    while graph is not None:
        if graph is outer:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


class Instrumentation:
    """The wrappers of one Watch; `on_step_end(trace)` is called when a step's tensors are in."""

    def __init__(self, model, optimizers, kinds, on_step_end, stop=False):
        # Keras 3 or tf_keras: raises here, before anything is wrapped, if either cannot be watched.
        self.flavour = flavours.of_model(model)
        self.optimizer_flavours = [flavours.of_optimizer(o) for o in optimizers]
        if stop and any(f is not flavours.KERAS3 for f in [self.flavour] + self.optimizer_flavours):
            raise flavours.UnsupportedError(
                'on_nonfinite="stop" needs Keras 3 models and optimizers; tf_keras is watched in '
                'record mode (on_nonfinite="record")'
            )
        self.stop = stop  # stop mode: snapshots to restore, the batch to keep
        self.model = model
        self.optimizers = list(optimizers)
        self.kinds = kinds
        self.on_step_end = on_step_end
        self.layer_order = site_catalogue.layer_paths(model, self.flavour)
        self._local = threading.local()
        self._restore = []

    # -- state of the step being traced (one per thread: replicas trace in threads) --------------
    @property
    def trace(self):
        return getattr(self._local, "trace", None)

    @trace.setter
    def trace(self, value):
        self._local.trace = value

    @property
    def _suppressed(self):
        return getattr(self._local, "suppressed", 0)

    def _step_trace(self, begin=True):
        """The trace of the step being traced in the current graph; a new one if this is a new
        step and `begin`; None inside a nested graph of the step or outside training."""
        if self._suppressed:
            return None
        trace, graph = self.trace, _current_graph()
        if trace is not None and trace.graph is graph:
            return trace
        if trace is not None and _inside(graph, trace.graph):
            return None
        if not begin:
            return None
        trace = self.trace = self._new_trace(graph)
        return trace

    def _new_trace(self, graph, in_train_step=False):
        trace = StepTrace(graph, in_train_step)
        if self.stop:
            # The value of every variable of the model when the step begins.
            trace.snapshots = guard.Snapshots()
            trace.snapshots.take(guard.model_variables(self.model))
        return trace

    # -- wrapping ---------------------------------------------------------------------------------
    def install(self):
        if self._restore:
            return
        try:
            calls = self.flavour.layer_call
            self._wrap(self.model, "call", self._root_call, functools.partial(calls, self.model))
            for path, layer in self.layer_order:
                self._wrap(
                    layer,
                    "call",
                    functools.partial(self._layer_call, path),
                    functools.partial(calls, layer),
                )
            if hasattr(self.model, "compute_loss"):
                self._wrap(self.model, "compute_loss", self._compute_loss)
            if hasattr(self.model, "train_step"):
                self._wrap(self.model, "train_step", self._train_step)
            for optimizer, flavour in zip(self.optimizers, self.optimizer_flavours):
                self._wrap(
                    optimizer,
                    flavour.apply_method,
                    functools.partial(self._apply, optimizer, flavour),
                )
                if self.stop:
                    inner = site_catalogue.inner_optimizer(optimizer)
                    for name in ("assign_add", "assign_sub"):
                        if hasattr(inner, name):
                            self._wrap(inner, name, functools.partial(_update_by_assign, name))
        except BaseException:
            self.uninstall()  # all or nothing
            raise

    def uninstall(self):
        for obj, name, had_own, original in reversed(self._restore):
            if had_own:
                object.__setattr__(obj, name, original)
            else:
                try:
                    object.__delattr__(obj, name)
                except AttributeError:
                    pass
        self._restore = []

    def _wrap(self, obj, name, wrapper, calling=None):
        """Replaces `obj.name` by `wrapper(original, ...)`; `calling(original)`, if given, is what
        the wrapper calls as the original (tf_keras: through autograph, as tf_keras would)."""
        original = getattr(obj, name)
        had_own = name in vars(obj)
        target = calling(original) if calling is not None else original

        # Plain Python at trace time: autograph must not rewrite our bookkeeping.
        @tf.autograph.experimental.do_not_convert
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            return wrapper(target, *args, **kwargs)

        # object.__setattr__: Keras tracks attributes of built layers; a method is no state.
        object.__setattr__(obj, name, wrapped)
        self._restore.append((obj, name, had_own, original if had_own else None))

    # -- the wrappers -----------------------------------------------------------------------------
    def _train_step(self, original, *args, **kwargs):
        trace = self.trace = self._new_trace(_current_graph(), in_train_step=True)
        if args:
            data = args[0]
            x = data[0] if isinstance(data, (tuple, list)) and data else data
            if "input" in self.kinds:
                trace.inputs.extend(site_catalogue.float_tensors(x))
            if self.stop:
                trace.batch = batch_tensors(data)
            self._capture_targets(trace, data)
        logs = original(*args, **kwargs)
        self._finish(trace)
        return logs

    # -- targets and sample weights: what the step consumes besides the model's input -------------
    def _capture_targets(self, trace, data):
        """The float leaves of `y` and `sample_weight` in a train step's `data` (Keras' `(x,)`,
        `(x, y)` or `(x, y, sample_weight)`), named by their place in the structure."""
        if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
            return
        self._add_targets(trace, data[1], data[2] if len(data) == 3 else None)

    def _add_targets(self, trace, y, sample_weight):
        names = output_names(self.model)
        if "target" in self.kinds and y is not None:
            trace.targets.extend(site_catalogue.named_float_tensors(y, names))
        if "sample_weight" in self.kinds and sample_weight is not None:
            trace.sample_weights.extend(site_catalogue.named_float_tensors(sample_weight, names))

    def record_targets(self, y, sample_weight=None):
        """Custom loops: `y` (and `sample_weight`) as this step's target sites."""
        trace = self._step_trace()
        if trace is not None and not trace.in_train_step:
            self._add_targets(trace, y, sample_weight)
        return y

    def _root_call(self, original, *args, **kwargs):
        if kwargs.get("training") is False or not args:
            # Evaluation or predict: not a training step.
            self._local.suppressed = self._suppressed + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.suppressed -= 1
        trace = self._step_trace()
        if trace is not None and not trace.in_train_step:
            if "input" in self.kinds:
                trace.inputs.extend(site_catalogue.float_tensors(args[0]))
            if self.stop and not trace.batch:
                # A custom loop: the model's inputs are the batch this code sees.
                trace.batch = named_tensors(args[0], "x")
        return original(*args, **kwargs)

    def _layer_call(self, path, original, *args, **kwargs):
        trace = self._step_trace()
        if trace is None:
            if self.trace is not None and not self._suppressed:
                self.trace.nested.add(path)
            return original(*args, **kwargs)
        call = trace.begin_call(path)
        # Whose backward pass computes the gradient w.r.t. a layer's output: its consumers'.
        for t in tf.nest.flatten((args, kwargs)):
            producer = trace.produced_by.get(id(t))
            if producer is not None and call not in trace.consumers.setdefault(producer, []):
                trace.consumers[producer].append(call)
        first_op = op_count(trace.graph)
        try:
            outputs = original(*args, **kwargs)
        finally:
            trace.end_call()
        trace.layer_ops.append((path, first_op, op_count(trace.graph)))
        if self.trace is not trace or not any(
            k in self.kinds for k in ("activation", "activation_grad")
        ):
            return outputs
        flat = tf.nest.flatten(outputs)
        floats = site_catalogue.float_tensors(outputs)
        if not floats or any(t.graph is not trace.graph for t in floats if hasattr(t, "graph")):
            return outputs
        trace.activations.setdefault(call, [])
        if "activation" in self.kinds:
            trace.activations[call].extend(floats)
        if "activation_grad" not in self.kinds:
            return outputs
        first_own = op_count(trace.graph)
        probed = [
            grad_probe(trace, call, t) if isinstance(t, tf.Tensor) and t.dtype.is_floating else t
            for t in flat
        ]
        trace.own_ops.append((first_own, op_count(trace.graph)))
        for t in probed:
            trace.produced_by[id(t)] = call
        return tf.nest.pack_sequence_as(outputs, probed)

    def _compute_loss(self, original, *args, **kwargs):
        loss = original(*args, **kwargs)
        if kwargs.get("training", True) is not False:
            self.record_loss(loss)
        return loss

    def record_loss(self, loss):
        trace = self._step_trace()
        if trace is not None and "loss" in self.kinds:
            trace.losses.extend(site_catalogue.float_tensors(loss))
        return loss

    def _apply(self, optimizer, flavour, original, *args, **kwargs):
        """Keras 3's `apply(grads, variables)` or tf_keras's `apply_gradients(grads_and_vars)`."""
        trace = self._step_trace(begin=False)
        grads, variables, args, kwargs = flavour.apply_arguments(optimizer, args, kwargs)
        learning_rate = applied_learning_rate(optimizer) if trace is not None else None
        if trace is not None and trace.snapshots is not None and not _is_symbolic(grads):
            if not optimizer.built and variables:
                # Built here as apply() would build it, so that its new slots are snapshotted.
                import keras

                with keras.name_scope(optimizer.name, caller=optimizer):
                    optimizer.build(variables)
                optimizer.built = True
            trace.snapshots.take(variables)
            trace.snapshots.take(guard.optimizer_variables(optimizer))
        # Layers called inside the optimizer's own code are not part of the model's step.
        self._local.suppressed = self._suppressed + 1
        try:
            result = original(*args, **kwargs)
        finally:
            self._local.suppressed -= 1
        if trace is not None and not _is_symbolic(grads):
            trace.applies.append((optimizer, grads, variables))
            trace.learning_rates.append(learning_rate)
            # A custom loop has no train_step to end the step: it ends with the last watched
            # optimizer's apply.
            applied = {id(o) for o, _, _ in trace.applies}
            if not trace.in_train_step and all(id(o) in applied for o in self.optimizers):
                self._finish(trace)
        return result

    def _finish(self, trace):
        if self.trace is trace:
            self.trace = None
        # A step without a watched optimizer's apply is the Watch's to report (misuse).
        self.on_step_end(trace)


def applied_learning_rate(optimizer):
    """The learning rate `optimizer`'s next apply uses, as a tensor of the step (a schedule's
    value at the current iteration, read before the apply increments it), or None."""
    inner = site_catalogue.inner_optimizer(optimizer)
    try:
        current = getattr(inner, "_get_current_learning_rate", None)
        value = current() if current is not None else inner.learning_rate
        value = site_catalogue.variable_value(value)
    except Exception:  # an optimizer without a readable learning rate: no scalar, no failure
        return None
    return value if value.dtype.is_floating and value.shape.rank == 0 else None


def output_names(model):
    """The model's output names (a functional model's output layers), or ()."""
    try:
        names = getattr(model, "output_names", None)
    except Exception:  # a subclassed model that was never called has no outputs
        return ()
    return tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else ()


def op_count(graph):
    """How many ops `graph` holds so far (ops are numbered in creation order)."""
    nodes = getattr(graph, "_nodes_by_id", None)
    if nodes is not None:
        return len(nodes)
    return len(graph.get_operations()) if hasattr(graph, "get_operations") else 0


def _update_by_assign(name, original, variable, value):
    """Stop mode's `optimizer.assign_add` / `assign_sub`: `assign(variable +/- value)`, the same
    elementwise sum, into a new buffer the variable adopts.  In place, it would first copy the
    buffer that the step's snapshot still holds."""
    target = guard.tf_variable(variable)
    value = tf.cast(value, target.dtype)
    if isinstance(value, tf.IndexedSlices) or not isinstance(target, tf.Variable):
        return original(variable, value)
    current = target.read_value()
    target.assign(current + value if name == "assign_add" else current - value)


def named_tensors(structure, prefix):
    """[(name, tensor)] of a nested structure, named by its path: `x`, `x/0`, `x/image`."""
    out = []

    def visit(value, name):
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key], "%s/%s" % (name, key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, "%s/%d" % (name, i))
        elif isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "dtype"):
            try:
                out.append((name, tf.convert_to_tensor(value)))
            except (TypeError, ValueError):
                pass

    visit(structure, prefix)
    return out


def batch_tensors(data):
    """The tensors of a `train_step`'s data, named by Keras's structure: x, y, sample_weight."""
    import keras

    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return (
        named_tensors(x, "x")
        + (named_tensors(y, "y") if y is not None else [])
        + (named_tensors(sample_weight, "sample_weight") if sample_weight is not None else [])
    )


def _is_symbolic(values):
    return any(
        v is not None
        and not isinstance(v, (tf.Tensor, tf.IndexedSlices, tf.Variable))
        and not hasattr(v, "numpy")
        for v in values
    )


def grad_probe(trace, call, tensor):
    """Identity whose gradient records the gradient w.r.t. `tensor` (the output of a call)."""

    @tf.custom_gradient
    def probe(x):
        def grad(upstream):
            if isinstance(upstream, tf.IndexedSlices):
                upstream = tf.convert_to_tensor(upstream)
            trace.activation_grads.setdefault(call, []).append(upstream)
            return upstream

        return tf.identity(x), grad

    out = probe(tensor)
    # Keras reads these attributes off a layer's output (loss from logits, masks).
    for attr in ("_keras_logits", "_keras_mask"):
        if hasattr(tensor, attr):
            try:
                setattr(out, attr, getattr(tensor, attr))
            except AttributeError:
                pass
    return out


def find_optimizers(model, extra=()):
    """The optimizers that update `model`'s variables: `model.optimizer`, any optimizer held
    by the model as an attribute (a GAN's `d_optimizer` and `g_optimizer`), and `extra`.
    A LossScaleOptimizer stands for its inner optimizer."""
    found = []

    def add(candidate, named=False):
        # What the user names is kept (and checked by the Watch); found ones must look the part.
        if candidate is None or not (named or flavours.looks_like_optimizer(candidate)):
            return
        if any(candidate is o or candidate is getattr(o, "inner_optimizer", None) for o in found):
            return
        found.append(candidate)

    for optimizer in extra:
        add(optimizer, named=True)
    add(getattr(model, "optimizer", None))
    for value in list(vars(model).values()):
        add(value)
    return found
