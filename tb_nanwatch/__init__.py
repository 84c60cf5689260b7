"""tb_nanwatch: where did my TensorFlow training first go NaN or Inf?

    import tb_nanwatch
    model.fit(x, y, callbacks=[tb_nanwatch.NanWatchCallback("logs/run1")])

`NanWatchCallback` (Keras) and `Watch` (custom training loops) import TensorFlow
on first use; the reader, plugin and CLI never do.
"""

__version__ = "0.1.0"

from tb_nanwatch.bundle import BundleError, load_bundle

__all__ = [
    "NanWatchCallback",
    "Watch",
    "UnsupportedError",
    "load_bundle",
    "BundleError",
    "replay",
    "__version__",
]


def replay(run_dir, model=None, custom_objects=None):
    """Replays the run's repro bundle eagerly (needs TensorFlow); see `tb_nanwatch.replay_step`."""
    from tb_nanwatch import replay_step as replay_module

    return replay_module.replay(run_dir, model=model, custom_objects=custom_objects)


def __getattr__(name):
    if name in ("NanWatchCallback", "Watch", "UnsupportedError"):
        from tb_nanwatch import watch

        return getattr(watch, name)
    raise AttributeError("module 'tb_nanwatch' has no attribute %r" % name)
