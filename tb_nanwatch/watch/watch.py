"""`Watch`: the numerics of a model's training steps, recorded into a logdir.

The instrumentation (`instrument.py`) collects each traced step's tensors, the
site catalogue (`sites.py`) names them in execution order, the device ops
(`device.py`) reduce them inside the step, and the host side (`host.py`) turns
what the device kept into records (`tb_nanwatch.summary.RecordWriter`).
"""

import atexit
import logging
import os
import threading
import weakref

import numpy as np
import tensorflow as tf

from tb_nanwatch import bundle, early_warning, stats, summary
from tb_nanwatch.watch import device, distribute, guard, host, instrument, reads, sources
from tb_nanwatch.watch import sites as site_catalogue

logger = logging.getLogger("tb_nanwatch.watch")

DEFAULT_LOG_EVERY = 100  # 1,000,000 steps -> 10,000 rows per run
DEFAULT_FLIGHT_STEPS = 32
ON_NONFINITE = ("record", "stop")


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
      model: a Keras 3 or tf_keras (Keras 2) model (Sequential, functional, subclassed,
        nested).
      optimizer: its Keras optimizer (default `model.optimizer`).  A model or optimizer
        that cannot be watched raises `UnsupportedError` before anything is wrapped.
      optimizers: every optimizer a step applies, when there are several (a GAN's
        generator and discriminator optimizers); a step ends once each has applied.
      log_every: write one row every this many steps; a row aggregates its steps
        without losing any NaN/Inf (counts summed, first step kept).
      flight_steps: per-step rows kept on the device and written when the first
        non-finite value appears.
      kinds: the site kinds to watch (default all of `stats.KINDS`).
      check_every: the host reads one small vector every this many steps (a
        device sync on GPU); the first non-finite record is written then.
      group: write under `nanwatch/<group>/...` tags (a second model in one run).
      on_nonfinite: "record" (default) records and never changes what training computes;
        "stop" also rolls back, inside the step, every change the first non-finite step made
        to the model's and the optimizers' variables, keeps that step's batch on the device,
        writes a repro bundle (`tb_nanwatch.load_bundle`) and asks training to stop
        (`after_step()` returns True, `should_stop` holds).  Every later step is rolled back
        too, until training stops.
    """

    def __init__(
        self,
        logdir,
        model,
        optimizer=None,
        optimizers=None,
        log_every=DEFAULT_LOG_EVERY,
        flight_steps=DEFAULT_FLIGHT_STEPS,
        kinds=None,
        check_every=1,
        group=None,
        on_nonfinite="record",
    ):
        if log_every < 1 or flight_steps < 1 or check_every < 1:
            raise ValueError("log_every, flight_steps and check_every must be >= 1")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                "on_nonfinite must be one of %s, not %r" % (", ".join(ON_NONFINITE), on_nonfinite)
            )
        kinds = tuple(stats.KINDS if kinds is None else kinds)
        unknown = [k for k in kinds if k not in stats.KINDS]
        if unknown:
            raise ValueError(
                "unknown kinds %s; expected some of %s" % (unknown, ", ".join(stats.KINDS))
            )
        self.model = model
        strategy = getattr(model, "distribute_strategy", None)
        # Multi-worker training: each worker writes a run of its own under logdir.
        self._worker_names = distribute.worker_names(strategy)
        self.logdir = str(logdir)
        if len(self._worker_names) > 1:
            self.logdir = os.path.join(self.logdir, distribute.this_worker(strategy))
        named = ([optimizer] if optimizer is not None else []) + list(optimizers or [])
        if not named and getattr(model, "optimizer", None) is not None:
            named = [model.optimizer]
        if not named:
            raise ValueError("Watch needs the optimizer (compile the model or pass optimizer=)")
        self.optimizers = named
        self.optimizer = named[0]
        self.log_every = int(log_every)
        self.flight_steps = int(flight_steps)
        self.kinds = kinds
        self.check_every = int(check_every)
        self.group = group
        self.on_nonfinite = on_nonfinite
        self._lock = threading.Lock()
        self._instrumentation = instrument.Instrumentation(
            model, self.optimizers, kinds, self._end_step, stop=on_nonfinite == "stop"
        )
        self._batch_store = guard.BatchStore()
        self.bundle_path = None  # stop mode: the repro bundle, once written
        self.op_sources_path = None  # nanwatch_ops.json, written at the first traced step
        self._sites = None  # fixed at the first traced step
        self._getters = None
        self._consumers = {}
        self._state = None  # device variables
        self._writer = None
        self._first_written = False
        self._skips_seen = 0
        self._collapse_reported = False
        self._last_row_step = -1
        self._host_calls = 0
        self._pending_last = 0
        self._traced_without_apply = False
        self._misuse_warned = False
        self._forecast = None
        self._initial = None  # {id(variable): (variable, statistics)} before the first update
        self._initial_written = False
        self.early_warning = None  # the early-warning event, once written
        self.first_nonfinite = None  # the record, once written
        self._closed = False
        self.instrument()
        _open_watches.add(self)

    # ------------------------------------------------------------------ lifecycle
    def instrument(self):
        """Wraps layers, `compute_loss`, `train_step` and the optimizers (idempotent)."""
        self._instrumentation.install()
        if (
            self._state is None
            and getattr(self.model, "built", False)
            and self.model.trainable_variables
        ):
            # Before tracing, under the model's strategy: mirrored, one write per step.
            self._state = self._create_state(
                site_catalogue.capacity(
                    self._instrumentation.layer_order,
                    self.model.trainable_variables,
                    self.optimizers,
                    outputs=len(instrument.output_names(self.model)),
                )
            )
        if self._initial is None and self._sites is None and not self._host_calls:
            self._snapshot_initial()

    def _snapshot_initial(self):
        """Statistics of every weight and built optimizer slot as training starts (rows log
        weights after each step's update), written as the `initial` record once the sites are
        known.  One eager pass over the variables, before the first step."""
        if not getattr(self.model, "built", False):
            return  # a model built in its first call: its weights do not exist yet
        variables = site_catalogue.watched_variables(self.model, self.optimizers)
        if not variables:
            return
        values = [site_catalogue.variable_value(v) for v in variables]
        rows = device.snapshot_rows(values)
        self._initial = {id(v): (v, row) for v, row in zip(variables, rows)}

    def _write_initial(self):
        self._initial_written = True
        if not self._initial:
            return
        row = np.full((len(self._sites), len(stats.STATS)), np.nan)
        found = False
        for i, getter in enumerate(self._getters):
            variable = getattr(getter, "variable", None)
            kept = self._initial.get(id(variable)) if variable is not None else None
            if kept is not None and kept[0] is variable:
                row[i] = kept[1]
                found = True
        if found:
            self._ensure_writer().write_initial(row)

    def uninstrument(self):
        """Restores every wrapped method."""
        self._instrumentation.uninstall()

    def reopen(self):
        """Watches again after `close()` (a second `fit()`): the same sites and device state,
        records into a new event file."""
        self._closed = False
        self._writer = None
        self._first_written = self.first_nonfinite is not None
        _open_watches.add(self)
        self.instrument()

    def _create_state(self, capacity):
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            state = device.DeviceState(
                capacity,
                self.flight_steps,
                strategy.num_replicas_in_sync,
                gather=distribute.ReplicaGather(strategy),
                optimizers=len(self.optimizers),
            )
        if self._pending_last:
            state.last_step.assign(self._pending_last - 1)
        return state

    # ------------------------------------------------------------------ trace time
    def record_loss(self, loss):
        """Records `loss` as this step's loss site and returns it unchanged (custom loops)."""
        return self._instrumentation.record_loss(loss)

    def record_targets(self, y, sample_weight=None):
        """Records `y` (and `sample_weight`) as this step's target (and sample weight) sites in a
        custom loop, one site per float tensor of the structure; returns `y` unchanged.  With
        `model.fit` they are watched without it."""
        return self._instrumentation.record_targets(y, sample_weight)

    def _end_step(self, trace):
        """Called at trace time once a step's tensors are known: the device ops of the step."""
        if not trace.applies:
            self._traced_without_apply = True
            return
        built = None
        if self._sites is None:
            built = site_catalogue.build(
                trace,
                self.model.name,
                self._instrumentation.layer_order,
                self.kinds,
                self._instrumentation.flavour,
            )
            self._ensure_capacity(len(built[0]))
        with self._lock:  # replicas trace the step in threads of their own
            if self._sites is None:
                self._define_sites(trace, *built)
            if self.op_sources_path is None and not tf.executing_eagerly():
                try:
                    self.op_sources_path = sources.write(
                        self.logdir,
                        trace,
                        self.model.name,
                        dict(self._instrumentation.layer_order),
                    )
                except Exception:  # where ops come from is a help, never a reason to fail
                    self.op_sources_path = ""
                    logger.exception("tb_nanwatch: could not write the layers' op sources")
        loss_scaled = any(hasattr(o, "inner_optimizer") for o in self.optimizers)
        grad_sites = np.array([s["kind"] in stats.GRADIENT_KINDS for s in self._sites])
        copies = {}
        tensors = [
            [reads.for_reading(t, copies) for t in getter(trace)] for getter in self._getters
        ]
        dtypes = [tf.as_dtype(site["dtype"]) for site in self._sites]
        is_first, stopped = device.device_step(
            self._state, tensors, dtypes, self.log_every, grad_sites if loss_scaled else None
        )
        learning_rates = [None] * len(self.optimizers)
        for (optimizer, _, _), lr in zip(trace.applies, trace.learning_rates):
            index = next((i for i, o in enumerate(self.optimizers) if o is optimizer), None)
            if index is not None and lr is not None:
                learning_rates[index] = reads.for_reading(lr, copies)
        device.record_learning_rates(self._state, learning_rates)
        if trace.snapshots is not None:
            trace.snapshots.restore_if(stopped)
            with self._lock:
                self._batch_store.keep_if(is_first, trace.batch)

    def _ensure_capacity(self, n_sites):
        """Device state for `n_sites`, at the first trace.  The state made before tracing is
        sized by an estimate; a layer called several times in the step has a site per call,
        which only the trace shows.  Under a strategy every replica calls this with the same
        count (before any of them defines the sites), and the state is made once, in the
        cross-replica context (`merge_call`), as variables of the strategy must be."""
        if self._state is not None and n_sites <= self._state.capacity:
            return

        def create(*_):
            with tf.init_scope():
                self._state = self._create_state(n_sites)

        ctx = tf.distribute.get_replica_context()
        if ctx is not None and tf.distribute.has_strategy():
            ctx.merge_call(create)
        else:
            create()

    def _define_sites(self, trace, sites, getters):
        if len(sites) > self._state.capacity:
            logger.warning(
                "tb_nanwatch: %d sites, more than the %d planned: watching the first %d",
                len(sites),
                self._state.capacity,
                self._state.capacity,
            )
            sites, getters = sites[: self._state.capacity], getters[: self._state.capacity]
        self._sites, self._getters = sites, getters
        self._consumers = {k: list(v) for k, v in trace.consumers.items()}
        nested = sorted(trace.nested)
        if nested:
            logger.warning(
                "tb_nanwatch: %d layer(s) run inside a nested graph of the step (an RNN cell in its "
                "layer's loop, a tf.cond branch, map_fn) and are watched through the layer around them: %s",
                len(nested),
                ", ".join(nested[:8]) + (" ..." if len(nested) > 8 else ""),
            )
        updated = {id(v) for _, _, variables in trace.applies for v in variables}
        missed = [v.name for v in self.model.trainable_variables if id(v) not in updated]
        if missed:
            logger.warning(
                "tb_nanwatch: %d trainable variable(s) were updated by no watched optimizer (%s): pass the "
                "optimizer that updates them with optimizers=[...]",
                len(missed),
                ", ".join(missed[:5]),
            )
        self._forecast = early_warning.OverflowForecast(sites)

    # ------------------------------------------------------------------ host side
    def after_step(self):
        """Host side, after each training step: writes a row every `log_every` steps and
        the first non-finite record at once.  Returns True once that record exists."""
        self._host_calls += 1
        if self._closed:
            return self.first_nonfinite is not None
        if self._sites is None:
            self._warn_nothing_traced()
            return False
        if self._host_calls % self.check_every:
            return self.first_nonfinite is not None
        self._read_device(final=False)
        return self.first_nonfinite is not None

    def _read_device(self, final):
        if not self._initial_written:
            self._write_initial()
        poll = self._state.poll.numpy()
        steps_run = int(poll[host.POLL["steps_run"]])
        first_step = int(poll[host.POLL["first_step"]])
        if first_step >= 0 and not self._first_written:
            self._write_first(first_step)
            if self.on_nonfinite == "stop" and self.first_nonfinite is not None:
                self._stop(first_step)
        skips = int(poll[host.POLL["skips"]])
        if skips > self._skips_seen:
            self._write_skips(skips, int(poll[host.POLL["last_skip_step"]]))
        if (
            self._forecast is not None
            and self.early_warning is None
            and steps_run > 0
            and first_step < 0
        ):
            norms = poll[len(host.POLL_FIELDS) : len(host.POLL_FIELDS) + len(self._sites)]
            warning = self._forecast.update(steps_run - 1, norms)
            if warning:
                self._write_early_warning(warning)
        if (final and steps_run - 1 > self._last_row_step) or host.row_due(
            steps_run, self._last_row_step, self.log_every
        ):
            self._write_row(steps_run - 1)

    def _warn_nothing_traced(self, closing=False):
        """Once at the first after_step(), and again at close(): a misuse must not go unseen."""
        if self._misuse_warned and not closing:
            return
        self._misuse_warned = True
        when = (
            "closing %s after %d step(s) with nothing recorded: " % (self.logdir, self._host_calls)
            if closing
            else ""
        )
        if self._traced_without_apply:
            logger.warning(
                "tb_nanwatch: %sthe train step ran the model but never called %s() of a watched "
                "optimizer (%s): nothing is recorded; pass the optimizer that updates the model with "
                "optimizers=[...]",
                when,
                "/".join(
                    sorted({f.apply_method for f in self._instrumentation.optimizer_flavours})
                ),
                ", ".join(type(o).__name__ for o in self.optimizers),
            )
        else:
            logger.warning(
                "tb_nanwatch: %sno training step was traced with the Watch in place, so nothing is "
                "recorded: create the Watch before the train step's first call (a tf.function "
                "traced earlier keeps running uninstrumented)",
                when,
            )

    def expect_last_step(self, steps_from_now):
        """Tells the device that training ends after `steps_from_now` more steps, so the
        last (partial) row carries full statistics like every other."""
        self._pending_last = int(steps_from_now)
        if self._state is not None:
            steps_run = int(self._state.poll.numpy()[host.POLL["steps_run"]])
            self._state.last_step.assign(steps_run + self._pending_last - 1)

    def _ensure_writer(self):
        if self._writer is None:
            self._writer = summary.RecordWriter(
                self.logdir, self._sites, group=self.group, log_every=self.log_every
            )
        return self._writer

    def _write_row(self, last_step):
        acc = self._state.acc.numpy()[: len(self._sites)]
        self._state.reset_accumulators()
        scale, kinds = self._loss_scaled()
        row = host.unscale_gradients(host.row_from_accumulators(acc), self._sites, scale, kinds)
        if scale is not None and scale < 1 and not self._collapse_reported:
            self._collapse_reported = True
            self._ensure_writer().write_events(
                last_step, [{"type": "loss_scale_collapse", "step": last_step, "loss_scale": scale}]
            )
            logger.warning(
                "tb_nanwatch: the loss scale has collapsed to %g at step %d: gradients are "
                "scaled down and training may have stalled silently",
                scale,
                last_step,
            )
        self._ensure_writer().write_row(last_step, row)
        self._write_scalars(last_step, row, scale)
        self._last_row_step = last_step

    def _learning_rate_names(self):
        """`learning_rate` for one optimizer; `learning_rate/<name>` for several (a GAN's
        `learning_rate/d_optimizer`), numbered where names repeat."""
        if len(self.optimizers) == 1:
            return ["learning_rate"]
        names = [str(getattr(o, "name", "") or "optimizer") for o in self.optimizers]
        return [
            "learning_rate/%s" % (n if names.count(n) == 1 else "%s_%d" % (n, i))
            for i, n in enumerate(names)
        ]

    def _write_scalars(self, step, row, loss_scale):
        """The row's scalars for TensorBoard's Scalars tab, from what the row and the device
        already hold (metadata.SCALARS): no read of its own but the learning rates, with the row."""
        values = {}
        rates = self._state.learning_rates.numpy()
        for name, rate in zip(self._learning_rate_names(), rates):
            if np.isfinite(rate):
                values[name] = rate
        col = stats.STAT_INDEX
        kinds = np.array([s["kind"] for s in self._sites])
        loss = np.flatnonzero(kinds == "loss")
        if len(loss) and row[loss[0], col["size"]] > 0:
            values["loss"] = row[loss[0], col["mean"]]
        grads = np.flatnonzero(kinds == "weight_grad")
        norms = row[grads, col["norm"]]
        if np.isfinite(norms).any():
            values["gradient_norm"] = float(np.sqrt(np.nansum(np.square(norms))))
        if loss_scale is not None:
            values["loss_scale"] = loss_scale
        self._ensure_writer().write_scalars(step, values)

    def _write_first(self, step):
        n = len(self._sites)
        scale, kinds = self._loss_scaled()
        first_row = host.unscale_gradients(
            host.row_from_accumulators(self._state.first.numpy()[:n]), self._sites, scale, kinds
        )
        record = host.first_record(self._sites, first_row, self._consumers)
        if record is None:
            return
        record = host.replicas_of(
            record, self._state.first_replicas.numpy()[:, :n], self._worker_names
        )
        skips = int(self._state.poll.numpy()[host.POLL["skips"]])
        if skips:
            record["loss_scale_skips_before"] = skips
        writer = self._ensure_writer()
        # Flight recorder first, so the record that readers look for lands last, complete.
        sizes = self._state.acc.numpy()[:n, stats.STAT_INDEX["size"]]
        sizes = np.where(sizes > 0, sizes, first_row[:, stats.STAT_INDEX["size"]])
        steps, rows = host.flight_rows(
            self._state.ring_step.numpy(), self._state.ring.numpy()[:, :n], sizes, step, first_row
        )
        writer.write_flight(
            steps,
            [
                host.unscale_gradients(r, self._sites, scale, kinds) if s != step else r
                for s, r in zip(steps, rows)
            ],
        )
        writer.write_first_nonfinite(step, record)
        self._first_written = True
        self.first_nonfinite = dict(record, step=step)
        logger.warning(
            "tb_nanwatch: first non-finite value at step %d: %s (%d NaN, %d +Inf, %d -Inf)",
            step,
            summary.site_label(self._sites[record["site"]]),
            record["nan"],
            record["posinf"],
            record["neginf"],
        )

    @property
    def should_stop(self):
        """Stop mode: True once the first non-finite step was rolled back; train no further."""
        return self.on_nonfinite == "stop" and self.first_nonfinite is not None

    def _stop(self, step):
        try:
            self.bundle_path = self._write_bundle(step)
        except Exception:  # the record is on disk; a bundle that cannot be written must say so
            logger.exception("tb_nanwatch: could not write the repro bundle into %s", self.logdir)
        logger.warning(
            "tb_nanwatch: stop mode: step %d changed no variable of the model or optimizer; "
            "training stops%s",
            step,
            "; repro bundle (the batch and the state before the step) at %s" % self.bundle_path
            if self.bundle_path
            else "",
        )

    def _write_bundle(self, step):
        """The repro bundle of `step`: the variables hold their values from before it (the
        step was rolled back on the device), the batch is in the device's batch store."""
        notes = []
        if not self._batch_store.names and not self._batch_store.skipped:
            notes.append("the step's batch was not seen (a custom loop without a model call)")
        for name, why in self._batch_store.skipped:
            notes.append("the batch's %s is not kept: %s" % (name, why))
        weights = [(_variable_name(v), _to_numpy(v)) for v in guard.model_variables(self.model)]
        optimizer_variables = []
        for optimizer in self.optimizers:
            for v in guard.optimizer_variables(optimizer):
                optimizer_variables.append((_variable_name(v), _to_numpy(v)))
        return bundle.write_bundle(
            self.logdir,
            step=step,
            batch=self._batch_store.read(),
            weights=weights,
            optimizer_variables=optimizer_variables,
            policy=_policy_name(self.model),
            architecture=_architecture(self.model),
            rng=_rng_state(self.model),
            notes=notes,
            extra={
                "first_nonfinite": {
                    key: self.first_nonfinite.get(key)
                    for key in ("layer", "kind", "tensor", "nan", "posinf", "neginf")
                },
                "jit_compile": bool(getattr(self.model, "jit_compile", False)),
                "model_name": self.model.name,
            },
        )

    def _write_early_warning(self, warning):
        event = dict(warning, type="early_warning")
        self._ensure_writer().write_events(int(event["step"]), [event])
        self._ensure_writer().flush()
        self.early_warning = event
        site = self._sites[int(event["site"])] if "site" in event else None
        logger.warning(
            "tb_nanwatch: early warning at step %s: %s is on course to overflow %s",
            event["step"],
            summary.site_label(site) if site else "a site",
            "by step %s" % event["predicted_step"] if "predicted_step" in event else "soon",
        )

    def _loss_scaled(self):
        """(loss scale, the site kinds it multiplies) of the first loss-scaled optimizer, or
        (None, ())."""
        for optimizer, flavour in zip(self.optimizers, self._instrumentation.optimizer_flavours):
            scale = flavour.loss_scale(optimizer)
            if scale is not None:
                return scale, flavour.loss_scaled_kinds
        return None, ()

    def _loss_scale(self):
        return self._loss_scaled()[0]

    def _write_skips(self, total, last_step):
        event = {
            "type": "loss_scale_skip",
            "step": last_step,
            "skips_total": total,
            "new_skips": total - self._skips_seen,
        }
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
                self._read_device(final=True)
            elif self._host_calls:
                self._warn_nothing_traced(closing=True)
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


def _variable_name(variable):
    return str(getattr(variable, "path", None) or variable.name)


def _to_numpy(variable):
    return np.asarray(site_catalogue.variable_value(variable).numpy())


def _policy_name(model):
    policy = getattr(model, "dtype_policy", None)
    if policy is None:
        import keras

        policy = keras.config.dtype_policy()
    return getattr(policy, "name", str(policy))


def _architecture(model):
    """The model's architecture as Keras serialises it (JSON text), or None when it does not."""
    try:
        return model.to_json()
    except Exception as e:  # subclassed models without get_config, custom objects, ...
        logger.info("tb_nanwatch: the model's architecture does not serialise (%s)", e)
        return None


def _rng_state(model):
    """Keras's RNG state where it keeps one: the global seed and its seed generator, and the
    seed generators of the model's layers (their states are also among the weights)."""
    out = {}
    try:
        from keras.src.backend.common import global_state

        seed = global_state.get_global_attribute("global_random_seed")
        if seed is not None:
            out["global_random_seed"] = int(seed)
        generator = global_state.get_global_attribute("global_seed_generator")
        if generator is not None and getattr(generator, "state", None) is not None:
            out["global_seed_generator_state"] = _to_numpy(generator.state).tolist()
    except Exception:  # pragma: no cover - a Keras without these internals
        pass
    generators = {
        _variable_name(v): _to_numpy(v).tolist()
        for v in guard.model_variables(model)
        if "seed_generator" in _variable_name(v)
    }
    if generators:
        out["seed_generators"] = generators
    return out


# Watches still open at exit (a crash, an uncaught exception) flush what they have.
_open_watches = weakref.WeakSet()


@atexit.register
def _close_open_watches():
    for watch in list(_open_watches):
        try:
            watch.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            logger.exception("tb_nanwatch: could not close %s", watch.logdir)
