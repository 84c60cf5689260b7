"""Where each watched layer's ops come from: op types and the user's source lines, at trace time.

Every op of a traced graph carries its creation stack (`tf.Operation.traceback`), free at run
time.  The instrumentation notes which ops each layer call created (`StepTrace.layer_ops`); an
op belongs to the innermost layer whose call created it.  Of its stack only the user's frames
inside that layer's call are kept (not TensorFlow's, Keras's, tb_nanwatch's or Python's own),
so a built-in layer lists its op types with no source, and a custom layer's `call` names the
file and line of each op.  Written once per Watch, at its first traced step, as JSON
(`tb_nanwatch.op_sources` reads it without TensorFlow).
"""

import json
import os
import sysconfig

import tensorflow as tf

from tb_nanwatch import op_sources

# Ops a layer lists with their source lines (its op types are all counted).
MAX_OPS_PER_LAYER = 64
FRAMES_PER_OP = 3

_LIBRARY_ROOTS = tuple(
    os.path.realpath(p)
    for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")}
    if p
)
_INTERNAL_PACKAGES = ("tensorflow", "keras", "tb_nanwatch", "tf_keras", "absl", "tensorboard")


def _package_dirs():
    import importlib.util

    dirs = []
    for name in _INTERNAL_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for location in getattr(spec, "submodule_search_locations", None) or []:
            dirs.append(os.path.realpath(location))
    return tuple(dirs)


_INTERNAL_DIRS = None


def is_user_frame(filename):
    """Whether a frame's file is the user's (not TensorFlow, Keras, tb_nanwatch or Python)."""
    global _INTERNAL_DIRS
    if _INTERNAL_DIRS is None:
        _INTERNAL_DIRS = _package_dirs()
    if not filename or filename.startswith("<"):
        return False
    path = os.path.realpath(filename)
    return not any(path.startswith(d + os.sep) for d in _INTERNAL_DIRS + _LIBRARY_ROOTS)


def _frames_inside_call(frames):
    """The user's frames of an op's stack that run inside the innermost watched layer call."""
    start = 0
    for i, frame in enumerate(frames):
        if frame.name == "_layer_call" and frame.filename.endswith(
            os.path.join("watch", "instrument.py")
        ):
            start = i + 1
    inside = [f for f in frames[start:] if is_user_frame(f.filename)]
    return [
        {"file": f.filename, "line": int(f.lineno), "function": f.name}
        for f in inside[-FRAMES_PER_OP:]
    ]


def _ours(frames):
    """An op tb_nanwatch made (a gradient probe): its innermost non-TensorFlow frame is ours."""
    for frame in reversed(frames):
        path = os.path.realpath(frame.filename)
        if "tb_nanwatch" in path and not is_user_frame(frame.filename):
            return True
        if is_user_frame(frame.filename) or "keras" in path:
            return False
    return False


def layer_sources(trace):
    """{layer path: {"op_types": {type: count}, "ops": [...], "ops_left_out": n}} of a traced
    step: the ops each layer call created, innermost layer first."""
    ops = trace.graph.get_operations()
    claimed = set()
    layers = {}
    for path, first, end in trace.layer_ops:  # inner calls complete (and claim) first
        entry = layers.setdefault(path, {"op_types": {}, "ops": [], "ops_left_out": 0})
        for index in range(first, min(end, len(ops))):
            if index in claimed:
                continue
            claimed.add(index)
            op = ops[index]
            try:
                frames = list(op.traceback)
            except Exception:  # pragma: no cover - an op without a stack
                frames = []
            if _ours(frames):
                continue
            entry["op_types"][op.type] = entry["op_types"].get(op.type, 0) + 1
            source = _frames_inside_call(frames)
            if not source:
                continue
            if len(entry["ops"]) < MAX_OPS_PER_LAYER:
                entry["ops"].append({"type": op.type, "name": op.name, "source": source})
            else:
                entry["ops_left_out"] += 1
    return layers


def write(logdir, trace, model_name):
    """Writes `<logdir>/nanwatch_ops.json` for `trace` and returns its path."""
    record = {
        "format": op_sources.FORMAT,
        "version": op_sources.VERSION,
        "model": model_name,
        "layers": layer_sources(trace),
    }
    tf.io.gfile.makedirs(logdir)
    path = os.path.join(logdir, op_sources.FILENAME)
    staging = path + ".tmp"
    with tf.io.gfile.GFile(staging, "w") as f:
        f.write(json.dumps(record, indent=1))
    tf.io.gfile.rename(staging, path, overwrite=True)
    return path
