"""`NanWatchCallback`: a `Watch` for `model.fit`, as a Keras callback."""

import warnings

import keras

from tb_nanwatch.watch import flavour as flavours
from tb_nanwatch.watch import instrument
from tb_nanwatch.watch.watch import DEFAULT_FLIGHT_STEPS, DEFAULT_LOG_EVERY, ON_NONFINITE, Watch


class NanWatchCallback(keras.callbacks.Callback):
    """Logs per-layer numerics and the exact first NaN/Inf of a `model.fit` run.

    For every layer: statistics of its activations, of the gradient w.r.t. its
    output and its weights, of its weights and the optimizer's slots, plus the
    inputs and the loss; NaN, +Inf and -Inf counted separately; on the device,
    inside the compiled train step (also `jit_compile=True`).  Open the logdir in
    TensorBoard's NanWatch tab or run `tb-nanwatch report LOGDIR`.  Works with Keras 3
    and with tf_keras (Keras 2, `tf.keras` under TF_USE_LEGACY_KERAS=1) models alike.

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
      on_nonfinite: "record" (default): record, never change what training computes;
        "stop": the first non-finite step is rolled back on the device (it changes no
        weight and no optimizer variable), its batch and the state before it are written
        as a repro bundle into the logdir (`tb_nanwatch.load_bundle(logdir)`), and
        training stops.
      stop_on_nonfinite: deprecated; `True` means `on_nonfinite="stop"`.
      check_every: read the device's status every this many steps.
      optimizers: optimizers the model's `train_step` applies that are neither
        `model.optimizer` nor held by the model as attributes (those are found).
    """

    watch_class = Watch
    # tf_keras's CallbackList asks callbacks which hooks they implement and whether they take
    # tensors in `logs` (Keras 3 asks neither).
    _supports_tf_logs = False

    def _implements_train_batch_hooks(self):
        return True

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False

    def __init__(
        self,
        logdir,
        log_every=DEFAULT_LOG_EVERY,
        flight_steps=DEFAULT_FLIGHT_STEPS,
        kinds=None,
        stop_on_nonfinite=None,
        check_every=1,
        optimizers=None,
        on_nonfinite=None,
    ):
        super().__init__()
        self.logdir = str(logdir)
        if stop_on_nonfinite is not None:
            warnings.warn(
                "NanWatchCallback(stop_on_nonfinite=...) is deprecated: use "
                'on_nonfinite="stop" (roll the step back and stop) or "record"',
                DeprecationWarning,
                stacklevel=2,
            )
            alias = "stop" if stop_on_nonfinite else "record"
            if on_nonfinite is not None and on_nonfinite != alias:
                raise ValueError(
                    "stop_on_nonfinite=%r and on_nonfinite=%r disagree: pass on_nonfinite only"
                    % (stop_on_nonfinite, on_nonfinite)
                )
            on_nonfinite = alias
        on_nonfinite = on_nonfinite or "record"
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                "on_nonfinite must be one of %s, not %r" % (", ".join(ON_NONFINITE), on_nonfinite)
            )
        self._options = dict(
            log_every=log_every,
            flight_steps=flight_steps,
            kinds=kinds,
            check_every=check_every,
            on_nonfinite=on_nonfinite,
        )
        self._extra_optimizers = list(optimizers or [])
        self.on_nonfinite = on_nonfinite
        self.watch = None
        self._train_function = None  # our traced train function, kept for the next fit()
        self._train_function_key = None

    def on_train_begin(self, logs=None):
        self._build_optimizers()
        if self.watch is None:
            self.watch = self.watch_class(
                self.logdir,
                self.model,
                optimizers=instrument.find_optimizers(self.model, self._extra_optimizers),
                **self._options,
            )
        else:
            self.watch.reopen()
        if self._train_function is not None and self._train_function_key == self._compiled_key():
            # A second fit() reuses the function traced with the instrumentation, as plain Keras does.
            self.model.train_function = self._train_function
        else:
            # fit() made its train function before calling us: trace it again, instrumented.
            self.model.make_train_function(force=True)
        steps, epochs = self.params.get("steps"), self.params.get("epochs")
        if steps and epochs:
            self.watch.expect_last_step(steps * epochs)

    def _build_optimizers(self):
        """Builds the optimizer's slots before the step is traced, as Keras itself does under a
        distribution strategy (`Trainer._symbolic_build`).  Built inside the trace instead, they
        make TensorFlow trace the whole step twice, and the instrumentation with it."""
        optimizer = getattr(self.model, "optimizer", None)
        variables = self.model.trainable_variables if getattr(self.model, "built", False) else []
        if optimizer is None or not variables:
            return
        flavour = flavours.of_optimizer(optimizer)  # an unsupported one raises here, unwrapped
        if not flavour.built(optimizer):
            flavour.build(optimizer, variables, self.model.distribute_strategy)

    def on_train_batch_end(self, batch, logs=None):
        self.watch.after_step()
        if self.watch.should_stop:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        try:
            self.watch.close()
        finally:
            # Later fit() calls without this callback, evaluate() and predict() must not run our
            # ops; this callback's next fit() takes the function back.
            self._train_function = self.model.train_function
            self._train_function_key = self._compiled_key()
            self.model.train_function = None

    def _compiled_key(self):
        model = self.model
        return (
            id(model.optimizer),
            id(flavours.of_model(model).compiled_loss(model)),
            getattr(model, "jit_compile", None),
            getattr(model, "steps_per_execution", None),
            id(model.distribute_strategy),
        )
