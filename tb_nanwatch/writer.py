"""The summary writer: per-layer numerics of every training step, on the device.

`NanWatchCallback` (for `model.fit`) and `Watch` (for hand-written loops) wrap
the model's layers, its `compute_loss` and its optimizer's `apply` *before* the
train function is traced, so the statistics are ordinary graph ops inside the
user's (compiled, even XLA) train step:

* each watched tensor is reduced once per step (`reduce_sum`: a sum is
  non-finite whenever any element is), the per-site sums of a step form one
  vector, and everything else is vectorised over sites;
* only when a sum is non-finite, or on a step that ends a row, a `tf.cond`
  computes the full statistics (exact NaN/+Inf/-Inf counts, finite min/max/...);
* accumulators, the first non-finite site and a ring buffer of the last R steps
  (the flight recorder) live in `tf.Variable`s; the host reads one small vector
  per step and writes a row every `log_every` steps, and the first non-finite
  record, with the flight recorder, the moment it appears.

Sites, in execution order within a step: input, activations (forward order),
loss, then backward layer by layer (gradient w.r.t. the layer's output, then
its weight gradients), then per variable the optimizer slots and the updated
weight.  The first site of that order that holds a non-finite value is the
producer; later ones are propagators.
"""

import atexit
import functools
import logging
import os
import threading
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from tb_nanwatch import stats, summary

logger = logging.getLogger(__name__)

DEFAULT_LOG_EVERY = 100     # 1,000,000 steps -> 10,000 rows per run
DEFAULT_FLIGHT_STEPS = 32

# Columns computed by the full-statistics branch, in this order.
SAMPLED = ("min", "max", "mean", "std", "max_abs", "norm", "zero_frac", "headroom", "underflow_frac")
_S = {name: i for i, name in enumerate(SAMPLED)}
_HALF = (tf.float16, tf.bfloat16)
_GRAD_KINDS = ("activation_grad", "weight_grad")
# Statistics in the units of the tensor, divided by the loss scale for gradients.
_SCALED_BY_LOSS_SCALE = ("min", "max", "mean", "std", "max_abs", "norm", "mean_every_step")

# poll vector the host reads each step: [steps run, first non-finite step, loss-scale skips, last skip step]
_P_STEP, _P_FIRST, _P_SKIPS, _P_LAST_SKIP = range(4)


class _StepTrace:
    """Tensors of one traced training step, gathered as the step's Python code runs."""

    def __init__(self, graph=None):
        self.graph = graph                # the (function) graph the step is traced in
        self.inputs = []
        self.activations = {}        # layer path -> [tensor], forward completion order
        self.activation_grads = {}   # layer path -> [tensor], backward order
        self.losses = []
        self.produced_by = {}        # id(output tensor) -> layer path
        self.consumers = {}          # layer path -> [paths of layers that took its output]


def _float_tensors(structure):
    return [t for t in tf.nest.flatten(structure)
            if isinstance(t, tf.Tensor) and t.dtype.is_floating]


def _layer_paths(model):
    """[(path, layer)] of every layer below the root, depth first in definition order;
    paths are the user's names joined by '/', e.g. 'encoder/block_2/dense'."""
    out, seen = [], set()

    def visit(layer, prefix):
        for child in getattr(layer, "_layers", []):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = prefix + child.name
            out.append((path, child))
            visit(child, path + "/")

    visit(model, "")
    return out


def _slot_name(attr):
    """`_velocities` -> `velocity`, `_momentums` -> `momentum`."""
    name = attr.lstrip("_")
    if name.endswith("ies"):
        return name[:-3] + "y"
    return name[:-1] if name.endswith("s") else name


def _optimizer_slots(optimizer):
    """[(slot name, [variable or None per trainable variable])] of a Keras 3 optimizer."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    n = len(getattr(inner, "_trainable_variables", []))
    slots = []
    if not n:
        return slots
    for attr, value in sorted(vars(inner).items()):
        if attr in ("_trainable_variables", "_variables") or not isinstance(value, list) or len(value) != n:
            continue
        if all(v is None or hasattr(v, "assign") for v in value) and any(v is not None for v in value):
            slots.append((_slot_name(attr), value))
    return slots


class Watch:
    """Records the numerics of `model` trained by `optimizer` into `logdir`.

    For custom training loops (eager or `tf.function`, also `jit_compile=True`);
    `NanWatchCallback` does the same for `model.fit`.  Create it before the train
    step is first traced; call `after_step()` on the host after every step.

    ```python
    watch = tb_nanwatch.Watch("logs/custom", model, optimizer)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = watch.record_loss(loss_fn(y, pred))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for x, y in dataset:
        train_step(x, y)
        if watch.after_step():   # True once a non-finite value has been recorded
            break
    watch.close()
    ```

    Args:
      logdir: directory of this run's event files (`tensorboard --logdir` its parent).
      model: a Keras 3 model (Sequential, functional, subclassed, nested).
      optimizer: its Keras optimizer (default `model.optimizer`).
      log_every: write one row every this many steps; a row aggregates its steps
        without losing any NaN/Inf (counts summed, first step kept).
      flight_steps: per-step rows kept on the device and written when the first
        non-finite value appears.
      kinds: the site kinds to watch (default all of `stats.KINDS`).
      check_every: the host reads one small vector every this many steps (a
        device sync on GPU); the first non-finite record is written then.
      group: write under `nanwatch/<group>/...` tags (a second model in one run).
    """

    def __init__(self, logdir, model, optimizer=None, log_every=DEFAULT_LOG_EVERY,
                 flight_steps=DEFAULT_FLIGHT_STEPS, kinds=None, check_every=1, group=None,
                 floor_only=False):
        if log_every < 1 or flight_steps < 1 or check_every < 1:
            raise ValueError("log_every, flight_steps and check_every must be >= 1")
        kinds = tuple(stats.KINDS if kinds is None else kinds)
        unknown = [k for k in kinds if k not in stats.KINDS]
        if unknown:
            raise ValueError("unknown kinds %s; expected some of %s" % (unknown, ", ".join(stats.KINDS)))
        self.model = model
        # Multi-worker training: each worker writes a run of its own under logdir.
        self._worker_names = _worker_names(getattr(model, "distribute_strategy", None))
        self._workers = len(self._worker_names)
        self.logdir = str(logdir)
        if self._workers > 1:
            self.logdir = os.path.join(self.logdir, _this_worker(model.distribute_strategy))
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
        if self.optimizer is None:
            raise ValueError("Watch needs the optimizer (compile the model or pass optimizer=)")
        self.log_every = int(log_every)
        self.flight_steps = int(flight_steps)
        self.kinds = kinds
        self.check_every = int(check_every)
        self.group = group
        # Benchmark baseline: one reduce_sum per site per step into a variable, nothing else.
        self.floor_only = floor_only
        self._local = threading.local()
        self._lock = threading.Lock()
        self._restore = []
        self._sites = None          # fixed at the first traced step
        self._consumers = {}
        self._pending_last = 0
        self._collapse_reported = False
        self._state = None          # device variables
        self._writer = None
        self._first_written = False
        self._skips_seen = 0
        self._last_row_step = -1
        self._host_calls = 0
        self.first_nonfinite = None  # the record, once written
        self._closed = False
        self.instrument()
        _open_watches.add(self)

    # ------------------------------------------------------------------ wrapping
    @property
    def _trace(self):
        return getattr(self._local, "trace", None)

    @_trace.setter
    def _trace(self, value):
        self._local.trace = value

    def instrument(self):
        """Wraps layers, `compute_loss` and the optimizer (idempotent)."""
        if self._restore:
            return
        self._layer_order = _layer_paths(self.model)
        self._wrap(self.model, "call", self._root_call)
        for path, layer in self._layer_order:
            self._wrap(layer, "call", functools.partial(self._layer_call, path))
        if hasattr(self.model, "compute_loss"):
            self._wrap(self.model, "compute_loss", self._compute_loss)
        self._wrap(self.optimizer, "apply", self._apply)
        if self._state is None and getattr(self.model, "built", False) and self.model.trainable_variables:
            # Before tracing, under the model's strategy: mirrored, one write per step.
            self._state = self._create_state(self._capacity())

    def uninstrument(self):
        """Restores every wrapped method."""
        for obj, name, had_own, original in reversed(self._restore):
            if had_own:
                object.__setattr__(obj, name, original)
            else:
                try:
                    object.__delattr__(obj, name)
                except AttributeError:
                    pass
        self._restore = []

    def _wrap(self, obj, name, wrapper):
        original = getattr(obj, name)
        had_own = name in vars(obj)

        # Plain Python at trace time: autograph must not rewrite our bookkeeping.
        @tf.autograph.experimental.do_not_convert
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            return wrapper(original, *args, **kwargs)

        # object.__setattr__: Keras tracks attributes of built layers; a method is no state.
        object.__setattr__(obj, name, wrapped)
        self._restore.append((obj, name, had_own, original if had_own else None))

    def _root_call(self, original, *args, **kwargs):
        if kwargs.get("training") is False or not args:
            previous, self._trace = self._trace, None   # evaluation/predict: not a training step
            try:
                return original(*args, **kwargs)
            finally:
                self._trace = previous
        trace = self._trace
        graph = tf.compat.v1.get_default_graph()
        if trace is None or trace.graph is not graph:
            # A new step; a second call of the model in the same step adds to the same sites.
            trace = self._trace = _StepTrace(graph)
        if "input" in self.kinds:
            trace.inputs.extend(_float_tensors(args[0]))
        return original(*args, **kwargs)

    def _layer_call(self, path, original, *args, **kwargs):
        trace = self._trace
        if trace is not None:
            # Whose backward pass computes the gradient w.r.t. a layer's output: its consumers'.
            for t in tf.nest.flatten((args, kwargs)):
                producer = trace.produced_by.get(id(t))
                if producer is not None and path not in trace.consumers.setdefault(producer, []):
                    trace.consumers[producer].append(path)
        outputs = original(*args, **kwargs)
        trace = self._trace
        if trace is None or not any(k in self.kinds for k in ("activation", "activation_grad")):
            return outputs
        flat = tf.nest.flatten(outputs)
        if not any(isinstance(t, tf.Tensor) and t.dtype.is_floating for t in flat):
            return outputs
        if "activation" in self.kinds:
            trace.activations.setdefault(path, []).extend(_float_tensors(outputs))
        if "activation_grad" not in self.kinds:
            trace.activations.setdefault(path, [])
            return outputs
        trace.activations.setdefault(path, [])
        probed = [_grad_probe(trace, path, t) if isinstance(t, tf.Tensor) and t.dtype.is_floating else t
                  for t in flat]
        for t in probed:
            trace.produced_by[id(t)] = path
        return tf.nest.pack_sequence_as(outputs, probed)

    def _compute_loss(self, original, *args, **kwargs):
        loss = original(*args, **kwargs)
        if kwargs.get("training", True) is not False:
            self.record_loss(loss)
        return loss

    def record_loss(self, loss):
        """Records `loss` as this step's loss site and returns it unchanged (custom loops)."""
        trace = self._trace
        if trace is not None and "loss" in self.kinds:
            trace.losses.extend(_float_tensors(loss))
        return loss

    def _apply(self, original, grads, trainable_variables=None, *args, **kwargs):
        trace, self._trace = self._trace, None
        grads = list(grads)
        variables = list(trainable_variables) if trainable_variables is not None else list(
            getattr(getattr(self.optimizer, "inner_optimizer", self.optimizer), "_trainable_variables", []))
        result = original(grads, trainable_variables, *args, **kwargs)
        if trace is not None and not _is_symbolic(grads):
            self._end_step(trace, grads, variables)
        return result

    # ------------------------------------------------------------------ sites
    def _build_sites(self, trace, grads, variables):
        """The site list, in execution order, with a getter for each site's tensors."""
        model_name = self.model.name
        sites, getters = [], []

        def add(layer, kind, tensor, getter, dtype="float32", shape=()):
            if kind in self.kinds:
                sites.append(summary.make_site(layer, kind, tensor, dtype, shape))
                getters.append(getter)

        def describe(tensors):
            if not tensors:
                return "float32", ()
            t = tensors[0]
            return t.dtype.name, tuple(t.shape.as_list()) if t.shape.rank is not None else ()

        if trace.inputs:
            add(model_name, "input", "", lambda tr, g: tr.inputs, *describe(trace.inputs))
        forward = list(trace.activations)
        for path in forward:
            add(path, "activation", "", lambda tr, g, p=path: tr.activations.get(p, []),
                *describe(trace.activations[path]))
        if trace.losses or "loss" in self.kinds:
            add(model_name, "loss", "", lambda tr, g: tr.losses, *describe(trace.losses))
        # Backward, layer by layer: the gradient arriving at a layer's output, then its weights'.
        owner = {}
        for path, layer in self._layer_order:
            for v in getattr(layer, "_trainable_variables", []):
                owner[id(v)] = path
        recorded = list(trace.activation_grads)
        reverse_forward = list(reversed(forward))
        if recorded == [p for p in reverse_forward if p in trace.activation_grads]:
            backward = reverse_forward
        else:
            backward = recorded + [p for p in reverse_forward if p not in trace.activation_grads]
        placed = set()

        def weight_grads_of(path):
            for i, v in enumerate(variables):
                if owner.get(id(v), model_name) == path and id(v) not in placed:
                    placed.add(id(v))
                    add(path, "weight_grad", v.name, lambda tr, g, i=i: _gradient_values(g[i]),
                        v.dtype, tuple(v.shape))

        for path in backward:
            add(path, "activation_grad", "", lambda tr, g, p=path: tr.activation_grads.get(p, []),
                *describe(trace.activations.get(path, [])))
            weight_grads_of(path)
        for v in variables:   # weights no watched layer owns (e.g. the model's own), last
            weight_grads_of(owner.get(id(v), model_name))
        # Per variable, as the optimizer updates them: its slots, then the new value.
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        slots = _optimizer_slots(self.optimizer)
        for v in variables:
            path = owner.get(id(v), model_name)
            try:
                j = inner._get_variable_index(v)
            except (AttributeError, KeyError):
                j = None
            for slot_name, slot_vars in slots:
                slot = slot_vars[j] if j is not None else None
                if slot is not None:
                    add(path, "optimizer_state", "%s/%s" % (slot_name, v.name),
                        lambda tr, g, s=slot: [_value(s)], slot.dtype, tuple(slot.shape))
            add(path, "weight", v.name, lambda tr, g, v=v: [_value(v)], v.dtype, tuple(v.shape))
        return sites, getters

    # ------------------------------------------------------------------ device side
    def _capacity(self):
        """An upper bound on the number of sites, known before the step is traced."""
        layers = len(self._layer_order)
        variables = len(self.model.trainable_variables)
        slots = len(_optimizer_slots(self.optimizer)) if getattr(self.optimizer, "built", False) else 4
        return 2 + 2 * layers + variables * (2 + slots)

    def _create_state(self, capacity):
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            state = _DeviceState(capacity, self.flight_steps, strategy.num_replicas_in_sync)
        if self._pending_last:
            state.last_step.assign(self._pending_last - 1)
        return state

    def _end_step(self, trace, grads, variables):
        with self._lock:   # replicas trace the step in threads of their own
            if self._sites is None:
                sites, getters = self._build_sites(trace, grads, variables)
                if self._state is None:
                    with tf.init_scope():
                        self._state = self._create_state(len(sites))
                if len(sites) > self._state.capacity:
                    logger.warning("tb_nanwatch: %d sites, more than the %d planned: watching the first %d",
                                   len(sites), self._state.capacity, self._state.capacity)
                    sites, getters = sites[:self._state.capacity], getters[:self._state.capacity]
                self._sites, self._getters = sites, getters
                self._consumers = {k: list(v) for k, v in trace.consumers.items()}
        grad_kinds = np.array([s["kind"] in _GRAD_KINDS for s in self._sites])
        loss_scaled = hasattr(self.optimizer, "inner_optimizer")
        tensors = [getter(trace, grads) for getter in self._getters]
        if self.floor_only:
            sums = tf.stack([tf.add_n([_sum32(t) for t in ts]) if ts else tf.constant(0.0) for ts in tensors])
            self._state.floor.assign(tf.pad(sums, [[0, self._state.capacity - len(tensors)]]))
            self._state.poll.assign_add(tf.constant([1, 0, 0, 0], tf.int64))
            return
        dtypes = [tf.as_dtype(site["dtype"]) for site in self._sites]
        _device_step(self._state, tensors, self.log_every, grad_kinds if loss_scaled else None, dtypes)

    # ------------------------------------------------------------------ host side
    def after_step(self):
        """Host side, after each training step: writes a row every `log_every` steps and
        the first non-finite record at once.  Returns True once that record exists."""
        self._host_calls += 1
        if self._sites is None or self._closed or self.floor_only:
            return self.first_nonfinite is not None
        if self._host_calls % self.check_every:
            return self.first_nonfinite is not None
        poll = self._state.poll.numpy()
        steps_run = int(poll[_P_STEP])
        if poll[_P_FIRST] >= 0 and not self._first_written:
            self._write_first(int(poll[_P_FIRST]))
        if poll[_P_SKIPS] > self._skips_seen:
            self._write_skips(int(poll[_P_SKIPS]), int(poll[_P_LAST_SKIP]))
        # Rows end at step 0 (the state training starts from) and at every step s with
        # (s + 1) % log_every == 0, as the device samples them.
        if self._last_row_step < 0 or steps_run // self.log_every > (self._last_row_step + 1) // self.log_every:
            self._write_row(steps_run - 1)
        return self.first_nonfinite is not None

    def expect_last_step(self, steps_from_now):
        """Tells the device that training ends after `steps_from_now` more steps, so the
        last (partial) row carries full statistics like every other."""
        self._pending_last = int(steps_from_now)
        if self._state is not None:
            self._state.last_step.assign(int(self._state.poll.numpy()[_P_STEP]) + self._pending_last - 1)

    def _ensure_writer(self):
        if self._writer is None:
            self._writer = summary.RecordWriter(self.logdir, self._sites, group=self.group,
                                                 log_every=self.log_every)
        return self._writer

    def _write_row(self, last_step):
        st = self._state
        n = len(self._sites)
        acc = st.acc.numpy()[:n]
        column = lambda name: acc[:, _A[name]]
        row = _row_matrix(column("steps").max(), column("size"), acc[:, _A["nan"]:_A["neginf"] + 1],
                          column("nonfinite_steps"), column("first"), column("mean_sum"), column("mean_n"),
                          acc[:, _A[SAMPLED[0]]:])
        st.reset_accumulators()
        scale = self._loss_scale()
        if scale is not None and scale > 0:
            # Gradients carry the loss scale; show them as the model sees them after unscaling.
            grads = np.array([s["kind"] in _GRAD_KINDS for s in self._sites])
            for name in _SCALED_BY_LOSS_SCALE:
                row[grads, stats.STAT_INDEX[name]] /= scale
            if scale < 1 and not self._collapse_reported:
                self._collapse_reported = True
                self._ensure_writer().write_events(last_step, [{
                    "type": "loss_scale_collapse", "step": last_step, "loss_scale": scale}])
                logger.warning("tb_nanwatch: the loss scale has collapsed to %g at step %d: gradients are "
                               "scaled down and training may have stalled silently", scale, last_step)
        self._ensure_writer().write_row(last_step, row)
        self._last_row_step = last_step

    def _write_first(self, step):
        st = self._state
        n = len(self._sites)
        first = st.first.numpy()[:n]
        counts = first[:, :3].astype(np.int64)
        bad = np.flatnonzero(counts.sum(axis=1) > 0)
        if not len(bad):
            return
        producer = int(bad[0])
        def describe(i):
            site = self._sites[i]
            out = dict(layer=site["layer"], kind=site["kind"], tensor=site["tensor"], nan=int(counts[i, 0]),
                       posinf=int(counts[i, 1]), neginf=int(counts[i, 2]))
            if site["kind"] == "activation_grad":
                # The gradient w.r.t. this output was computed in the backward pass of these layers.
                out["backward_of"] = self._consumers.get(site["layer"], [])
            return out

        record = describe(producer)
        record.update(site=producer, propagators=[describe(int(i)) for i in bad[1:]])
        replicas = st.first_replicas.numpy()[:, :n]
        if replicas.shape[0] > 1:
            # Under tf.distribute: the replicas (global ids) whose shard held the producer's values.
            saw = [int(r) for r in np.flatnonzero(replicas[:, producer])]
            record.update(replica=saw[0] if saw else None, replicas=saw)
            per_worker = replicas.shape[0] // max(self._workers, 1)
            if self._workers > 1 and saw:
                record["worker"] = self._worker_names[min(saw[0] // per_worker, self._workers - 1)]
        skips = int(st.poll.numpy()[_P_SKIPS])
        if skips:
            record["loss_scale_skips_before"] = skips
        writer = self._ensure_writer()
        # Flight recorder first, so the record that readers look for lands last, complete.
        ring_step = st.ring_step.numpy()
        order = np.argsort(ring_step)
        order = [i for i in order if 0 <= ring_step[i] <= step]
        size = st.acc.numpy()[:n, _A["size"]]
        ring = st.ring.numpy()[:, :n]
        ring_counts, ring_mean = ring[..., :3], ring[..., 3]
        first_sampled = first[:, 3:]
        flight_rows = []
        for i in order:
            rc = ring_counts[i]
            is_first = ring_step[i] == step
            nonfinite = (rc.sum(axis=1) > 0).astype(np.float64)
            first_col = np.where(nonfinite > 0, float(ring_step[i]), -1.0)
            sampled = first_sampled if is_first else np.full((n, len(SAMPLED)), np.nan)
            flight_rows.append(_row_matrix(1, size, rc, nonfinite, first_col, ring_mean[i],
                                           np.ones(len(self._sites)), sampled))
        writer.write_flight([int(ring_step[i]) for i in order], flight_rows)
        writer.write_first_nonfinite(step, record)
        self._first_written = True
        self.first_nonfinite = dict(record, step=step)
        logger.warning("tb_nanwatch: first non-finite value at step %d: %s (%d NaN, %d +Inf, %d -Inf)",
                       step, summary.site_label(self._sites[producer]), record["nan"], record["posinf"],
                       record["neginf"])

    def _loss_scale(self):
        scale = getattr(self.optimizer, "dynamic_scale", None)
        return None if scale is None else float(_value(scale).numpy())

    def _write_skips(self, total, last_step):
        event = {"type": "loss_scale_skip", "step": last_step, "skips_total": total,
                 "new_skips": total - self._skips_seen}
        scale = self._loss_scale()
        if scale is not None:
            event["loss_scale"] = scale
        self._ensure_writer().write_events(last_step, [event])
        self._skips_seen = total

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Writes the last partial row, flushes and closes; restores the model's methods."""
        if self._closed:
            return
        try:
            if self._sites is not None:
                poll = self._state.poll.numpy()
                if poll[_P_FIRST] >= 0 and not self._first_written:
                    self._write_first(int(poll[_P_FIRST]))
                if poll[_P_SKIPS] > self._skips_seen:
                    self._write_skips(int(poll[_P_SKIPS]), int(poll[_P_LAST_SKIP]))
                if int(poll[_P_STEP]) - 1 > self._last_row_step:
                    self._write_row(int(poll[_P_STEP]) - 1)
            if self._writer is not None:
                self._writer.close()
        finally:
            self._closed = True
            self.uninstrument()
            _open_watches.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def sites(self):
        """The site list (dicts of layer, kind, tensor, dtype, shape), once the step was traced."""
        return list(self._sites or [])


# Watches still open at exit (a crash, an uncaught exception) flush what they have.
_open_watches = weakref.WeakSet()


@atexit.register
def _close_open_watches():
    for watch in list(_open_watches):
        try:
            watch.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.exception("tb_nanwatch: could not close %s", watch.logdir)


def _worker_names(strategy):
    """Task names of a multi-worker strategy in replica order ("chief_0", "worker_0", ...), else []."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or getattr(resolver, "task_type", None) is None:
        return []
    spec = resolver.cluster_spec().as_dict()
    return ["%s_%d" % (job, i) for job in ("chief", "worker") for i in range(len(spec.get(job, [])))]


def _this_worker(strategy):
    resolver = strategy.cluster_resolver
    return "%s_%d" % (resolver.task_type, resolver.task_id)


def _is_symbolic(values):
    return any(v is not None and not isinstance(v, (tf.Tensor, tf.IndexedSlices, tf.Variable))
               and not hasattr(v, "numpy") for v in values)


def _gradient_values(grad):
    """The tensors of one weight's gradient: none if it is not on the gradient path; for a
    sparse (embedding) gradient, its rows, not a dense copy of the whole table."""
    if grad is None:
        return []
    return [grad.values if isinstance(grad, tf.IndexedSlices) else grad]


def _value(variable):
    """The tf value of a Keras or tf variable."""
    v = getattr(variable, "value", variable)
    return tf.convert_to_tensor(v)


def _grad_probe(trace, path, tensor):
    """Identity whose gradient records the gradient w.r.t. `tensor` (a layer's output)."""

    @tf.custom_gradient
    def probe(x):
        def grad(upstream):
            if isinstance(upstream, tf.IndexedSlices):
                upstream = tf.convert_to_tensor(upstream)
            trace.activation_grads.setdefault(path, []).append(upstream)
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


class _DeviceState:
    """The variables one Watch keeps on the device, sized for `capacity` sites.

    Created eagerly before the train step is traced (under the model's
    distribution strategy, so they are mirrored); every replica assigns the same
    combined values, so only the first replica's write is kept."""

    def __init__(self, capacity, flight_steps, replicas=1):
        def var(value):
            return tf.Variable(value, trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

        nan32 = np.float32(np.nan)
        self.capacity = capacity
        self.poll = var(tf.constant([0, -1, 0, -1], tf.int64))
        self.floor = var(tf.zeros([capacity], tf.float32))
        # The last step of a fit() when Keras knows it: its partial row gets full statistics too.
        self.last_step = var(tf.constant(-1, tf.int64))
        # Accumulators of the row being built, one column per _ACC entry, sites as rows.
        self.acc = var(_acc_initial(capacity))
        # The first non-finite step: counts (3 columns) and SAMPLED; who saw it under tf.distribute.
        self.first = var(tf.fill([capacity, 3 + len(SAMPLED)], np.float64(np.nan)))
        self.first_replicas = var(tf.zeros([replicas, capacity], tf.int64))
        # Flight recorder: per step, counts (3 columns) and the mean, until the first record freezes it.
        self.ring_step = var(tf.fill([flight_steps], tf.constant(-1, tf.int64)))
        self.ring = var(tf.zeros([flight_steps, capacity, 4], tf.float64))

    def reset_accumulators(self):
        self.acc.assign(_acc_initial(self.capacity))


# Columns of the accumulator matrix and how a step's value joins them.
_ACC = ("steps", "size", "nan", "posinf", "neginf", "nonfinite_steps", "first", "mean_sum", "mean_n") + SAMPLED
_A = {name: i for i, name in enumerate(_ACC)}
_ACC_MAX = np.array([name == "size" for name in _ACC])
_ACC_FIRST = np.array([name == "first" for name in _ACC])
_ACC_LATEST = np.array([name in SAMPLED for name in _ACC])   # replaced when full statistics ran


def _acc_initial(capacity):
    row = np.zeros(len(_ACC))
    row[_A["first"]] = -1
    row[[_A[name] for name in SAMPLED]] = np.nan
    return tf.constant(np.tile(row, (capacity, 1)))


def _sum32(t):
    # Half-precision sums would overflow at 65504 and raise false alarms.
    if t.dtype in _HALF:
        t = tf.cast(t, tf.float32)
    return tf.cast(tf.reduce_sum(t), tf.float32)


def _size(t):
    known = t.shape.num_elements()      # a constant where the shape is static (weights, slots)
    return tf.constant(float(known)) if known is not None else tf.cast(tf.size(t), tf.float32)


def _counts(t):
    return tf.stack([tf.math.count_nonzero(tf.math.is_nan(t)),
                     tf.math.count_nonzero(tf.equal(t, np.inf)),
                     tf.math.count_nonzero(tf.equal(t, -np.inf))])


# Raw moments of one site, combinable across replicas: sums add, extremes take min/max.
_M = {name: i for i, name in enumerate(("finite", "sum", "sumsq", "min", "max", "zeros", "under"))}


def _raw_moments(tensors, robust):
    """float64 [len(_M)] over the finite elements of one site's tensors."""
    if not tensors:
        return tf.constant([0, 0, 0, np.inf, -np.inf, 0, 0], tf.float64)
    dtype = tensors[0].dtype
    tiny = _dtype_limits(dtype)[1]
    out = []
    for t in tensors:
        x = tf.reshape(tf.cast(t, tf.float32) if dtype in _HALF else t, [-1])
        zeros = tf.math.count_nonzero(tf.equal(x, 0))        # NaN != 0
        # NaN and Inf compare False: only finite elements count as underflow.
        under = tf.math.count_nonzero(tf.abs(x) < tiny) if dtype in _HALF else tf.constant(0, tf.int64)
        if robust:
            finite = tf.math.is_finite(x)
            n = tf.math.count_nonzero(finite)
            mn = tf.reduce_min(tf.where(finite, x, tf.cast(np.inf, x.dtype)))
            mx = tf.reduce_max(tf.where(finite, x, tf.cast(-np.inf, x.dtype)))
            x = tf.where(finite, x, tf.zeros_like(x))
        else:
            n, mn, mx = tf.size(x, out_type=tf.int64), tf.reduce_min(x), tf.reduce_max(x)
        out.append(tf.cast(tf.stack([tf.cast(v, tf.float64) for v in (
            n, *_sum_and_sumsq(x), mn, mx, zeros, under)]), tf.float64))
    if len(out) == 1:
        return out[0]
    stacked = tf.stack(out)
    return tf.concat([tf.reduce_sum(stacked[:, :3], 0), tf.reduce_min(stacked[:, 3:4], 0),
                      tf.reduce_max(stacked[:, 4:5], 0), tf.reduce_sum(stacked[:, 5:], 0)], 0)


def _sum_and_sumsq(x):
    """Sum and sum of squares of finite x, in float64 where float32 would overflow
    (|x| above ~1.8e19 squares to Inf): a second pass only then."""
    total, total_sq = tf.reduce_sum(x), tf.reduce_sum(tf.square(x))
    if x.dtype == tf.float64:
        return total, total_sq

    def widened():
        x64 = tf.cast(x, tf.float64)
        return tf.reduce_sum(x64), tf.reduce_sum(tf.square(x64))

    return tf.cond(tf.logical_and(tf.math.is_finite(total), tf.math.is_finite(total_sq)),
                   lambda: (tf.cast(total, tf.float64), tf.cast(total_sq, tf.float64)), widened)


def _combine_moments(moments):
    """[replicas, sites, len(_M)] -> [sites, len(_M)]."""
    return tf.concat([tf.reduce_sum(moments[..., :3], 0), tf.reduce_min(moments[..., 3:4], 0),
                      tf.reduce_max(moments[..., 4:5], 0), tf.reduce_sum(moments[..., 5:], 0)], -1)


def _dtype_limits(dtype):
    """(largest finite, smallest normal) of a float dtype."""
    if dtype == tf.bfloat16:
        return 3.3895314e38, 1.1754944e-38
    info = np.finfo(dtype.as_numpy_dtype)
    return float(info.max), float(info.tiny)


def _finish_moments(moments, sizes, largest, half):
    """[sites, len(_M)] raw moments -> [sites, len(SAMPLED)] float32 in SAMPLED order."""
    m = lambda name: moments[:, _M[name]]
    n = m("finite")
    has = n > 0
    nan64 = tf.fill(tf.shape(n), tf.constant(np.nan, tf.float64))
    size = tf.cast(sizes, tf.float64)
    safe_size = tf.where(size > 0, size, tf.ones_like(size))
    mean = tf.math.divide_no_nan(m("sum"), n)
    std = tf.sqrt(tf.maximum(tf.math.divide_no_nan(m("sumsq"), n) - mean * mean, 0.0))
    max_abs = tf.maximum(tf.abs(m("min")), tf.abs(m("max")))
    headroom = tf.where(max_abs > 0, tf.math.log(tf.constant(largest, tf.float64) / max_abs) / np.log(2.0),
                        tf.fill(tf.shape(n), tf.constant(np.inf, tf.float64)))
    cols = [m("min"), m("max"), mean, std, max_abs, tf.sqrt(m("sumsq")), headroom]
    mn, mx, mean, std, max_abs, norm, headroom = [tf.where(has, c, nan64) for c in cols]
    zero_frac = tf.where(size > 0, m("zeros") / safe_size, nan64)
    underflow = tf.where(tf.logical_and(tf.constant(half), size > 0), m("under") / safe_size, nan64)
    return tf.cast(tf.stack([mn, mx, mean, std, max_abs, norm, zero_frac, headroom, underflow], 1), tf.float32)


def _cond(pred, true_fn, false_fn):
    """tf.cond kept as a functional If op: when lowered to Switch/Merge, every op of the
    branch not taken still runs as a dead node each step, and these branches are big."""
    graph = tf.compat.v1.get_default_graph()
    if tf.executing_eagerly() or not hasattr(graph, "get_operations"):
        return tf.cond(pred, true_fn, false_fn)
    before = len(graph.get_operations())
    out = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[before:]:
        if op.type in ("If", "StatelessIf"):
            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return out


def _gather(ctx, value):
    """[replicas, ...] of `value` from every replica (just [1, ...] without distribution)."""
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value[None]
    return ctx.all_gather(value[None], axis=0)


def _device_step(st, tensors, log_every, grad_kinds, dtypes):
    """One training step's graph ops: the reductions, the conditional full statistics,
    combining replicas, and the accumulator, first-record and flight-recorder updates."""
    n, cap = len(tensors), st.capacity
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync == 1:
        ctx = None
    present = tf.constant(np.array([bool(ts) for ts in tensors]))
    local_sums = tf.stack([tf.add_n([_sum32(t) for t in ts]) if ts else tf.constant(0.0) for ts in tensors])
    local_sizes = tf.stack([tf.add_n([_size(t) for t in ts]) if ts else tf.constant(0.0) for ts in tensors])
    # Collective 1: every replica learns the global sums, so all take the same branches below.
    gathered = _gather(ctx, tf.stack([local_sums, local_sizes], 1))
    sums, sizes = tf.reduce_sum(gathered[..., 0], 0), tf.reduce_sum(gathered[..., 1], 0)
    hint = tf.logical_not(tf.math.is_finite(sums))
    any_hint = tf.reduce_any(hint)
    step = st.poll[_P_STEP]
    ends_row = tf.reduce_any(tf.stack([tf.equal(tf.math.floormod(step + 1, log_every), 0),
                                       tf.equal(step, st.last_step), tf.equal(step, 0)]))
    ran_full = tf.logical_or(ends_row, any_hint)

    def counts():
        return tf.stack([tf.cast(_counts(tf.concat([tf.reshape(t, [-1]) for t in ts], 0)), tf.float64) if ts
                         else tf.zeros([3], tf.float64) for ts in tensors])

    def moments(robust):
        return tf.stack([_raw_moments(ts, robust) for ts in tensors])

    local_counts = _cond(any_hint, counts, lambda: tf.zeros([n, 3], tf.float64))
    # One branch, robust to non-finite values: it costs two extra passes on sampled steps only,
    # and a second (finite-only) variant doubled the graph and the trace time.
    local_moments = _cond(ran_full, lambda: moments(True), lambda: tf.zeros([n, len(_M)], tf.float64))
    # Collective 2: counts summed, moments combined; per replica, who saw a non-finite value.
    gathered = _gather(ctx, tf.concat([local_counts, local_moments], 1))
    per_replica_nonfinite = tf.cast(tf.reduce_sum(gathered[..., :3], -1) > 0, tf.int64)   # [replicas, n]
    step_counts = tf.cast(tf.reduce_sum(gathered[..., :3], 0), tf.int64)
    largest = [_dtype_limits(d)[0] for d in dtypes]
    half = [d in _HALF for d in dtypes]
    step_sampled = tf.where(ran_full, _finish_moments(_combine_moments(gathered[..., 3:]), sizes, largest, half),
                            tf.fill([n, len(SAMPLED)], np.float32(np.nan)))
    nonfinite = tf.reduce_sum(step_counts, axis=1) > 0
    safe_sizes = tf.where(sizes > 0, sizes, tf.ones_like(sizes))
    step_mean = tf.where(hint, step_sampled[:, _S["mean"]], sums / safe_sizes)

    # Loss scaling: a step whose only non-finite values are gradients is skipped by design.
    if grad_kinds is not None:
        non_grad = tf.logical_and(nonfinite, tf.logical_not(tf.constant(grad_kinds)))
        is_skip = tf.logical_and(tf.reduce_any(nonfinite), tf.logical_not(tf.reduce_any(non_grad)))
    else:
        is_skip = tf.constant(False)

    def pad(x, fill=0):
        return tf.pad(x, [[0, cap - n]] + [[0, 0]] * (x.shape.rank - 1), constant_values=fill)

    step_counts_p, sizes_p, sampled_p = pad(step_counts), pad(sizes), pad(step_sampled, np.nan)
    nonfinite_p, step_mean_p = pad(nonfinite, False), pad(step_mean)
    mean_ok = pad(tf.logical_and(present, tf.math.is_finite(step_mean)), False)
    # One matrix of this step's contributions, joined to the accumulators in one assign.
    ones = tf.ones([cap, 1], tf.float64)
    step64 = tf.cast(step, tf.float64)
    contribution = tf.concat([
        ones, tf.cast(sizes_p, tf.float64)[:, None], tf.cast(step_counts_p, tf.float64),
        tf.cast(nonfinite_p, tf.float64)[:, None], tf.where(nonfinite_p, step64, -1.0)[:, None],
        tf.where(mean_ok, tf.cast(step_mean_p, tf.float64), 0.0)[:, None], tf.cast(mean_ok, tf.float64)[:, None],
        tf.cast(sampled_p, tf.float64)], 1)
    old = st.acc.read_value()
    st.acc.assign(tf.where(
        tf.logical_and(tf.constant(_ACC_LATEST), ran_full), contribution,
        tf.where(tf.constant(_ACC_FIRST), tf.where(tf.logical_and(old < 0, contribution >= 0), contribution, old),
                 tf.where(tf.constant(_ACC_MAX), tf.maximum(old, contribution), old + contribution))))

    # First non-finite of the run (not a loss-scale skip), and the flight recorder frozen with it.
    recording = st.poll[_P_FIRST] < 0
    is_first = tf.logical_and(recording, tf.logical_and(tf.reduce_any(nonfinite), tf.logical_not(is_skip)))
    st.first.assign(tf.where(is_first, tf.concat([contribution[:, _A["nan"]:_A["neginf"] + 1],
                                                  contribution[:, _A[SAMPLED[0]]:]], 1), st.first))
    st.first_replicas.assign(tf.where(is_first, tf.pad(per_replica_nonfinite, [[0, 0], [0, cap - n]]),
                                      st.first_replicas))
    slot = tf.one_hot(tf.math.floormod(step, st.ring_step.shape[0]), st.ring_step.shape[0], on_value=True,
                      off_value=False)
    write = tf.logical_and(slot, recording)          # frozen once the first record exists
    st.ring_step.assign(tf.where(write, step, st.ring_step))
    now = tf.concat([contribution[:, _A["nan"]:_A["neginf"] + 1], tf.cast(step_mean_p, tf.float64)[:, None]], 1)
    st.ring.assign(tf.where(write[:, None, None], now[None], st.ring))
    st.poll.assign(tf.stack([
        step + 1,
        tf.where(is_first, step, st.poll[_P_FIRST]),
        st.poll[_P_SKIPS] + tf.cast(is_skip, tf.int64),
        tf.where(is_skip, step, st.poll[_P_LAST_SKIP]),
    ]))


def _row_matrix(steps, size, counts, nonfinite_steps, first, mean_sum, mean_n, sampled):
    """Host side: the device accumulators as one row in the statistics table's order."""
    n = len(size)
    row = np.full((n, len(stats.STATS)), np.nan)
    col = stats.STAT_INDEX
    size = np.asarray(size, dtype=np.float64)
    present = size > 0
    row[:, col["steps"]] = steps
    row[:, col["size"]] = size
    counts = np.asarray(counts, dtype=np.float64)
    for j, name in enumerate(stats.NONFINITE_STATS):
        row[:, col[name]] = np.where(present, counts[:, j], np.nan)
    row[:, col["nonfinite_steps"]] = np.where(present, nonfinite_steps, np.nan)
    first = np.asarray(first, dtype=np.float64)
    row[:, col["first_nonfinite_step"]] = np.where(first >= 0, first, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        row[:, col["mean_every_step"]] = np.where(np.asarray(mean_n) > 0, np.asarray(mean_sum) / np.asarray(mean_n), np.nan)
    sampled = np.asarray(sampled, dtype=np.float64)
    for name, j in _S.items():
        row[:, col[name]] = np.where(present, sampled[:, j], np.nan)
    return row


try:  # Keras is part of TensorFlow 2.16+ as Keras 3; the callback needs it.
    import keras as _keras
except ImportError:  # pragma: no cover
    _keras = tf.keras


class NanWatchCallback(_keras.callbacks.Callback):
    """Logs per-layer numerics and the exact first NaN/Inf of a `model.fit` run.

    For every layer: statistics of its activations, of the gradient w.r.t. its
    output and its weights, of its weights and the optimizer's slots, plus the
    inputs and the loss; NaN, +Inf and -Inf counted separately; on the device,
    inside the compiled train step (also `jit_compile=True`).  Open the logdir in
    TensorBoard's NanWatch tab or run `tb-nanwatch report LOGDIR`.

    ```python
    import numpy as np, keras, tb_nanwatch
    x = np.random.uniform(-1e10, 1e10, (4096, 1)).astype("float32")
    y = np.random.uniform(-1e10, 1e10, (4096, 1)).astype("float32")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, callbacks=[tb_nanwatch.NanWatchCallback("logs/f", log_every=10)])
    # tb-nanwatch report logs  ->  first +Inf at step 3: dense, optimizer state velocity/kernel
    ```

    Args:
      logdir: this run's directory (TensorBoard's `--logdir` is its parent).
      log_every: one row per this many steps (default 100); rows aggregate
        their steps without losing any NaN/Inf.
      flight_steps: steps kept at full resolution before the first non-finite.
      kinds: site kinds to watch (default all); e.g. leave out "weight" and
        "optimizer_state" for a leaner setting.
      stop_on_nonfinite: stop training once the first non-finite record is on
        disk (like TerminateOnNaN, but after recording).
      check_every: read the device's status every this many steps.
    """

    def __init__(self, logdir, log_every=DEFAULT_LOG_EVERY, flight_steps=DEFAULT_FLIGHT_STEPS,
                 kinds=None, stop_on_nonfinite=False, check_every=1):
        super().__init__()
        self.logdir = str(logdir)
        self._options = dict(log_every=log_every, flight_steps=flight_steps, kinds=kinds,
                             check_every=check_every)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.watch = None

    def on_train_begin(self, logs=None):
        if self.watch is None:
            self.watch = Watch(self.logdir, self.model, self.model.optimizer, **self._options)
        else:
            self.watch._closed = False
            _open_watches.add(self.watch)
            self.watch.instrument()
        # fit() made its train function before calling us: trace it again, instrumented.
        self.model.make_train_function(force=True)
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if steps and epochs:
            self.watch.expect_last_step(steps * epochs)

    def on_train_batch_end(self, batch, logs=None):
        if self.watch.after_step() and self.stop_on_nonfinite:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        watch = self.watch
        try:
            watch.close()
        finally:
            # Later fit()/evaluate() calls must not run our ops.
            self.model.train_function = None
            if watch._writer is not None:
                watch._writer = None   # a new event file if fit() is called again
                watch._first_written = watch.first_nonfinite is not None
