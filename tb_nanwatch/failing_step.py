"""What a run keeps about its failing step besides its records, read for the report and the tab.
TensorFlow-free: small files in the run directory, read as data (json, numpy; never pickle).

* the repro bundle (`bundle.describe`): written in stop mode, the batch and the state before
  the step;
* the producer layer's ops and their user source lines (`op_sources`), written at trace time;
* the replay's result (`nanwatch_replay.json`), written by `tb_nanwatch.replay`.

`facts(run_dir, layer)` gathers them: {"bundle", "producer_ops", "replay", "problems"}; a
damaged file is said in "problems", never raised.
"""

import json
import os

from tb_nanwatch import bundle, op_sources

REPLAY_FILENAME = "nanwatch_replay.json"


def write_replay(run_dir, result):
    """Keeps a replay's result (`ReplayResult.as_json()`) beside the run's records."""
    path = os.path.join(str(run_dir), REPLAY_FILENAME)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)
    return path


def read_replay(run_dir):
    """The last replay's result of the run, or None; ValueError when the file is damaged."""
    path = os.path.join(str(run_dir), REPLAY_FILENAME)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        try:
            value = json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError("%s is not valid JSON (%s)" % (path, e))
    if not isinstance(value, dict) or "verdict" not in value:
        raise ValueError("%s is not a replay result" % path)
    return value


def facts(run_dir, layer=None):
    """{"bundle", "producer_ops", "replay", "problems"} of a run directory (None for a run
    that is not a local directory)."""
    if not run_dir or not os.path.isdir(str(run_dir)):
        return None
    out = {"bundle": None, "producer_ops": [], "replay": None, "problems": []}
    try:
        out["bundle"] = bundle.describe(run_dir)
    except bundle.BundleError as e:
        out["problems"].append(str(e))
    if layer:
        try:
            out["producer_ops"] = [
                {"type": t, "file": f, "line": n, "function": fn}
                for t, f, n, fn in op_sources.source_lines(run_dir, layer)
            ]
        except op_sources.OpSourcesError as e:
            out["problems"].append(str(e))
    try:
        out["replay"] = read_replay(run_dir)
    except (OSError, ValueError) as e:
        out["problems"].append(str(e))
    return out


def op_words(op):
    """`Log at my_layers.py:42 in LogFeatures.call`."""
    source = op.get("source") if "source" in op else op
    if not source or not source.get("file"):
        return op.get("type", "?")
    return "%s at %s:%s in %s" % (
        op.get("type", "?"),
        os.path.basename(str(source["file"])),
        source.get("line"),
        source.get("function"),
    )


def remedy_words(replay):
    """["compute the layer in float32: finite after", "clip the gradients ...: did not hold",
    "clip ..., lower ...: not tried (why)", ...] for the remedies a replay tried, in its order,
    then those it could not try, grouped by why; a cause's remedy that is a change to the data,
    the model or the code is left out (the diagnosis gives it)."""
    out, untried = [], {}
    for trial in (replay or {}).get("remedies") or []:
        if not trial.get("applied"):
            if trial.get("remedy") and trial.get("why"):
                untried.setdefault(trial["why"], []).append(trial["remedy"])
            continue
        words = "%s: %s" % (
            trial.get("remedy"),
            "finite after" if trial.get("finite_after") else "did not hold",
        )
        if trial.get("cause") is None:
            words += " (a usual guess)"
        out.append(words)
    for why, remedies in untried.items():
        out.append("%s: not tried (%s)" % (", ".join(dict.fromkeys(remedies)), why))
    return out
