"""The repro bundle: the failing step's batch and the state it started from, on disk.

Written by a `Watch` in stop mode at the first non-finite step, into the run directory:

    <run>/nanwatch_bundle/manifest.json      what is where (format, step, names, dtypes, shapes)
    <run>/nanwatch_bundle/batch.npz          every input, target and sample weight of the step
    <run>/nanwatch_bundle/weights.npz        the model's variables before the step
    <run>/nanwatch_bundle/optimizer.npz      the optimizers' variables before the step

Arrays are stored under plain keys ("0", "1", ...) and named in the manifest, in order;
numpy's own format with `allow_pickle=False` both ways, never pickle.  Reading needs numpy
and json only (no TensorFlow), so the report and the CLI can describe a bundle anywhere.
"""

import json
import os
import shutil
import tempfile

import numpy as np

FORMAT = "tb_nanwatch.bundle"
VERSION = 1
DIRNAME = "nanwatch_bundle"
MANIFEST = "manifest.json"
# Part of the manifest -> its file.
ARRAY_FILES = {
    "batch": "batch.npz",
    "weights": "weights.npz",
    "optimizer_variables": "optimizer.npz",
}


class BundleError(Exception):
    """A repro bundle that is missing or cannot be read; the message names the path and why."""


def bundle_dir(run_dir):
    return os.path.join(str(run_dir), DIRNAME)


def _storable(array):
    """(array numpy can store without pickle, the dtype it stood for)."""
    array = np.asarray(array)
    dtype = str(array.dtype)
    if array.dtype.kind in "biufc?" and array.dtype.name == dtype:
        return array, dtype
    if array.dtype.kind in "SU":
        return array, dtype
    if array.dtype.kind == "O":  # strings from TensorFlow come as objects holding bytes
        return np.array(array.tolist(), dtype=bytes).reshape(array.shape), "bytes"
    # bfloat16 and the like (ml_dtypes) are not plain numpy: kept in float32, named as they were.
    return array.astype(np.float32), dtype


def write_bundle(
    run_dir,
    step,
    batch,
    weights,
    optimizer_variables,
    policy=None,
    architecture=None,
    rng=None,
    notes=None,
    extra=None,
):
    """Writes the bundle into `run_dir` (replacing an older one) and returns its path.

    batch, weights, optimizer_variables: [(name, numpy array)], in order; policy: the dtype
    policy's name; architecture: the model's JSON text or None; rng, extra: JSON-able dicts
    (extra: more manifest fields, e.g. the first non-finite site the bundle is about)."""
    target = bundle_dir(run_dir)
    os.makedirs(str(run_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".nanwatch_bundle.", dir=str(run_dir))
    try:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "state": "before_step",
            "policy": policy,
            "architecture": architecture,
            "rng": rng or {},
            "notes": list(notes or []),
        }
        manifest.update(extra or {})
        for part, filename in ARRAY_FILES.items():
            entries, arrays = [], {}
            for i, (name, value) in enumerate(
                {"batch": batch, "weights": weights, "optimizer_variables": optimizer_variables}[
                    part
                ]
            ):
                array, dtype = _storable(value)
                arrays[str(i)] = array
                entries.append(
                    {"name": str(name), "key": str(i), "dtype": dtype, "shape": list(array.shape)}
                )
            with open(os.path.join(staging, filename), "wb") as f:
                np.savez(f, **arrays)
            manifest[part] = {"file": filename, "arrays": entries}
        # The manifest last: a bundle with a manifest is complete.
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class Bundle:
    """A repro bundle read back: `.step`, `.batch`, `.weights`, `.optimizer_variables` (dicts
    of name -> numpy array, in the order they were written), `.policy`, `.architecture` (the
    model's JSON text or None), `.rng`, `.path`, `.manifest`."""

    def __init__(self, path, manifest, parts):
        self.path = path
        self.manifest = manifest
        self.step = manifest["step"]
        self.state = manifest.get("state", "before_step")
        self.policy = manifest.get("policy")
        self.architecture = manifest.get("architecture")
        self.rng = manifest.get("rng") or {}
        self.notes = manifest.get("notes") or []
        self.first_nonfinite = manifest.get("first_nonfinite")  # the site the bundle is about
        self.jit_compile = bool(manifest.get("jit_compile", False))
        self.batch = parts["batch"]
        self.weights = parts["weights"]
        self.optimizer_variables = parts["optimizer_variables"]

    def __repr__(self):
        return "Bundle(%r, step=%d, %d batch arrays, %d weights, %d optimizer variables)" % (
            self.path,
            self.step,
            len(self.batch),
            len(self.weights),
            len(self.optimizer_variables),
        )


def _read_manifest(path):
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise BundleError(
            "no repro bundle at %s (stop mode writes one at the first non-finite step)" % path
        )
    if not os.path.isfile(manifest_path):
        raise BundleError("repro bundle %s is incomplete: %s is missing" % (path, MANIFEST))
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise BundleError("repro bundle %s: %s is not valid JSON (%s)" % (path, MANIFEST, e)) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(
            "repro bundle %s: %s is not a tb_nanwatch bundle manifest" % (path, MANIFEST)
        )
    if manifest.get("version") != VERSION:
        raise BundleError(
            "repro bundle %s: format version %r, this tb_nanwatch reads version %d"
            % (path, manifest.get("version"), VERSION)
        )
    if not isinstance(manifest.get("step"), int) or manifest["step"] < 0:
        raise BundleError("repro bundle %s: %s has no valid step" % (path, MANIFEST))
    return manifest


def _read_part(path, manifest, part):
    spec = manifest.get(part)
    if not isinstance(spec, dict) or not isinstance(spec.get("arrays"), list):
        raise BundleError("repro bundle %s: %s does not list the %s" % (path, MANIFEST, part))
    filename = os.path.join(path, os.path.basename(str(spec.get("file", ARRAY_FILES[part]))))
    try:
        with np.load(filename, allow_pickle=False) as data:
            loaded = {key: data[key] for key in data.files}
    except FileNotFoundError as e:
        raise BundleError(
            "repro bundle %s: %s is missing" % (path, os.path.basename(filename))
        ) from e
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled or damaged arrays), OSError
        raise BundleError(
            "repro bundle %s: %s is damaged (%s: %s)"
            % (path, os.path.basename(filename), type(e).__name__, e)
        ) from e
    out = {}
    for entry in spec["arrays"]:
        key, name = str(entry.get("key")), entry.get("name")
        if key not in loaded:
            raise BundleError(
                "repro bundle %s: %s has no array %r (%s)"
                % (path, os.path.basename(filename), key, name)
            )
        array = loaded[key]
        if list(array.shape) != list(entry.get("shape", array.shape)):
            raise BundleError(
                "repro bundle %s: %s array %r has shape %s, the manifest says %s"
                % (path, os.path.basename(filename), name, list(array.shape), entry.get("shape"))
            )
        out[name] = array
    return out


def load_bundle(run_dir):
    """The repro bundle of the run in `run_dir` (or the bundle directory itself), as a `Bundle`.

    Raises BundleError, naming the path and what is wrong, when there is none or it is damaged."""
    run_dir = str(run_dir)
    path = run_dir if os.path.isfile(os.path.join(run_dir, MANIFEST)) else bundle_dir(run_dir)
    manifest = _read_manifest(path)
    parts = {part: _read_part(path, manifest, part) for part in ARRAY_FILES}
    return Bundle(path, manifest, parts)


def describe(run_dir):
    """`{"path", "step", "state"}` of the run's bundle, from its manifest alone, or None when
    the run has none.  A damaged manifest raises BundleError."""
    path = bundle_dir(run_dir)
    if not os.path.exists(path):
        return None
    manifest = _read_manifest(path)
    return {"path": path, "step": manifest["step"], "state": manifest.get("state", "before_step")}
