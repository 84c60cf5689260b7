"""Reading `<run>/nanwatch_ops.json`: each watched layer's op types and user source lines.

Written once per Watch at trace time (`tb_nanwatch.watch.sources`); read here with json only,
no TensorFlow, so the report can say "log_features: Log at my_layers.py:42 in call".

    {"format": "tb_nanwatch.ops", "version": 1, "model": "sequential",
     "layers": {"log_features": {"op_types": {"Abs": 1, "Log": 1},
                                 "ops": [{"type": "Log", "name": "sequential_1/log_features/Log",
                                          "source": [{"file": ..., "line": 42, "function": "call"}]}],
                                 "ops_left_out": 0}}}

`source` lists the user's frames inside the layer's call, outermost first (the last is the
line that created the op); ops without such frames (a built-in layer's) are only counted in
`op_types`.
"""

import json
import os

FORMAT = "tb_nanwatch.ops"
VERSION = 1
FILENAME = "nanwatch_ops.json"


class OpSourcesError(Exception):
    """A nanwatch_ops.json that cannot be read; the message names the path and why."""


def read_op_sources(run_dir):
    """{"model": name, "layers": {path: {"op_types", "ops", "ops_left_out"}}} of a run, or None
    when the run has no such record.  A damaged record raises OpSourcesError."""
    path = os.path.join(str(run_dir), FILENAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise OpSourcesError("%s is not valid JSON (%s)" % (path, e)) from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise OpSourcesError("%s is not a tb_nanwatch op record" % path)
    if record.get("version") != VERSION:
        raise OpSourcesError(
            "%s has format version %r; this tb_nanwatch reads version %d"
            % (path, record.get("version"), VERSION)
        )
    layers = record.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("op_types"), dict)
        and isinstance(v.get("ops"), list)
        for v in layers.values()
    ):
        raise OpSourcesError("%s: 'layers' is not a map of layer -> op_types and ops" % path)
    return {"model": record.get("model"), "layers": layers}


def source_lines(run_dir, layer):
    """[(op type, file, line, function)] of `layer`'s ops with a user source line (the line that
    created each op), in creation order; [] when none or no record."""
    record = read_op_sources(run_dir)
    if record is None or layer not in record["layers"]:
        return []
    out = []
    for op in record["layers"][layer]["ops"]:
        if op.get("source"):
            frame = op["source"][-1]
            out.append((op["type"], frame["file"], frame["line"], frame["function"]))
    return out
