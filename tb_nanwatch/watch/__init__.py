"""The summary writer: per-layer numerics of every training step, on the device.

The only part of tb_nanwatch that imports TensorFlow.  Modules, in the order a
step goes through them:

* `instrument`: wraps the model's layers, `compute_loss`, `train_step` and its
  optimizers before the train function is traced, and collects each traced
  step's tensors (`StepTrace`);
* `sites`: the site catalogue, the step's tensors named in execution order;
* `device`: the graph ops inside the step (one norm per tensor, the vectorised
  full statistics, accumulators, first record, flight recorder);
* `host`: plain numpy, the device state read back into records;
* `watch`: `Watch`, which ties them together for custom loops;
* `callback`: `NanWatchCallback` for `model.fit`;
* `flavour`: what differs between Keras 3 and tf_keras (Keras 2) models and optimizers;
* `distribute`: worker names under multi-worker training.
"""

from tb_nanwatch.watch.callback import NanWatchCallback
from tb_nanwatch.watch.flavour import UnsupportedError
from tb_nanwatch.watch.watch import DEFAULT_FLIGHT_STEPS, DEFAULT_LOG_EVERY, Watch

__all__ = [
    "NanWatchCallback",
    "Watch",
    "UnsupportedError",
    "DEFAULT_LOG_EVERY",
    "DEFAULT_FLIGHT_STEPS",
]
