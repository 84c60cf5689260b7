"""The benchmarks' floor: the writer's instrumentation and sites, but each step only the
once-per-step read (one L2 norm per watched tensor) into a variable, nothing else.  The
least any per-step watcher of these tensors can cost; `defaults` is measured against it."""

import numpy as np
import tensorflow as tf

import tb_nanwatch
from tb_nanwatch.watch import device


class FloorWatch(tb_nanwatch.Watch):
    def _end_step(self, trace):
        if not trace.applies:
            return
        with self._lock:
            if self._sites is None:
                self._define_sites(trace)
                with tf.init_scope():
                    self._floor = tf.Variable(
                        tf.zeros([len(self._sites)], tf.float32), trainable=False
                    )
        norms = [
            tf.add_n([device.l2_norm(device.flatten(t)) for t in getter(trace)])
            if getter(trace)
            else tf.constant(0.0)
            for getter in self._getters
        ]
        self._floor.assign(tf.cast(tf.stack(norms), tf.float32))

    def after_step(self):
        self._host_calls += 1
        return False

    def close(self):
        self._closed = True
        self.uninstrument()


class FloorCallback(tb_nanwatch.NanWatchCallback):
    watch_class = FloorWatch


def floor_values(callback):
    return np.asarray(callback.watch._floor.numpy())
