"""Where each watched layer's ops come from (nanwatch_ops.json), and the TF-free readers."""

import inspect
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import stop_scenarios as sc

import tb_nanwatch
from tb_nanwatch import bundle, op_sources

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _line_of(cls, text):
    lines, start = inspect.getsourcelines(cls.call)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_each_layer_lists_its_ops_and_the_users_source_lines(tmp_path):
    build, x, y, loss, make_optimizer, _ = sc.sqrt_gradient_at_zero()
    inner = build()
    # A nested block: its ops belong to its innermost layers, named by path.
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.Sequential([sc.LogFeatures(name="log_inner")], name="block"),
            inner,
        ],
        name="outer",
    )
    model.compile(optimizer=make_optimizer(), loss=loss)
    cb = tb_nanwatch.NanWatchCallback(str(tmp_path), log_every=4)
    model.fit(np.abs(x) + 1.0, y, batch_size=sc.BATCH, epochs=1, verbose=0, callbacks=[cb])
    assert cb.watch.op_sources_path == os.path.join(str(tmp_path), "nanwatch_ops.json")

    record = op_sources.read_op_sources(tmp_path)
    layers = record["layers"]
    assert record["model"] == "outer"
    assert layers["model/sqrt_abs"]["op_types"] == {"Abs": 1, "Sqrt": 1}
    line = _line_of(sc.SqrtAbs, "tf.sqrt")
    assert op_sources.source_lines(tmp_path, "model/sqrt_abs") == [
        ("Abs", os.path.join(HERE, "stop_scenarios.py"), line, "call"),
        ("Sqrt", os.path.join(HERE, "stop_scenarios.py"), line, "call"),
    ]
    assert layers["block/log_inner"]["op_types"] == {"Abs": 1, "Log": 1}
    assert op_sources.source_lines(tmp_path, "block/log_inner")[-1][:3] == (
        "Log",
        os.path.join(HERE, "stop_scenarios.py"),
        _line_of(sc.LogFeatures, "tf.math.log"),
    )
    # The block's own entry holds no op of its inner layer (innermost layer wins).
    assert "Log" not in layers.get("block", {"op_types": {}})["op_types"]
    # A built-in layer: its op types, no source line (its ops come from Keras).
    assert layers["model/hidden"]["op_types"].get("MatMul") == 1
    assert layers["model/hidden"]["ops"] == []
    # No tb_nanwatch probe and no framework frame anywhere.
    for entry in layers.values():
        for op in entry["ops"]:
            assert all("site-packages" not in f["file"] for f in op["source"])
            assert all("tb_nanwatch" not in f["file"] for f in op["source"])


def test_readers_are_tensorflow_free_and_say_what_is_wrong(tmp_path):
    code = (
        "import sys, tb_nanwatch, tb_nanwatch.op_sources, tb_nanwatch.bundle\n"
        "tb_nanwatch.load_bundle\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, sorted(sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    assert op_sources.read_op_sources(tmp_path) is None
    (tmp_path / "nanwatch_ops.json").write_text("{not json")
    with pytest.raises(op_sources.OpSourcesError, match="nanwatch_ops.json is not valid JSON"):
        op_sources.read_op_sources(tmp_path)
    (tmp_path / "nanwatch_ops.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(op_sources.OpSourcesError, match="not a tb_nanwatch op record"):
        op_sources.read_op_sources(tmp_path)


def _write_bundle(run_dir):
    return bundle.write_bundle(
        run_dir,
        step=7,
        batch=[("x", np.arange(6, dtype=np.float32).reshape(2, 3)), ("y", np.ones(2))],
        weights=[("model/dense/kernel", np.eye(3, dtype=np.float16))],
        optimizer_variables=[("adam/iteration", np.array(7, np.int64))],
        policy="mixed_float16",
        architecture='{"class_name": "Sequential"}',
        rng={"global_random_seed": 3},
    )


def test_bundle_round_trip_and_damage(tmp_path):
    path = _write_bundle(tmp_path)
    loaded = tb_nanwatch.load_bundle(tmp_path)
    assert (loaded.step, loaded.policy, loaded.rng) == (
        7,
        "mixed_float16",
        {"global_random_seed": 3},
    )
    assert list(loaded.batch) == ["x", "y"]
    np.testing.assert_array_equal(loaded.batch["x"], np.arange(6).reshape(2, 3))
    assert loaded.weights["model/dense/kernel"].dtype == np.float16
    assert int(loaded.optimizer_variables["adam/iteration"]) == 7
    assert bundle.describe(tmp_path) == {"path": path, "step": 7, "state": "before_step"}

    missing = tmp_path / "elsewhere"
    with pytest.raises(bundle.BundleError, match="no repro bundle at .*elsewhere"):
        tb_nanwatch.load_bundle(missing)
    assert bundle.describe(missing) is None

    # A truncated array file.
    data = (tmp_path / "nanwatch_bundle" / "batch.npz").read_bytes()
    (tmp_path / "nanwatch_bundle" / "batch.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(bundle.BundleError, match="batch.npz is damaged"):
        tb_nanwatch.load_bundle(tmp_path)
    # A pickled array is refused, never loaded.
    _write_bundle(tmp_path)
    with open(tmp_path / "nanwatch_bundle" / "weights.npz", "wb") as f:
        np.savez(f, **{"0": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(bundle.BundleError, match="weights.npz is damaged"):
        tb_nanwatch.load_bundle(tmp_path)
    # A manifest that is not JSON, or lists an array the file lacks.
    _write_bundle(tmp_path)
    manifest = tmp_path / "nanwatch_bundle" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{")
    with pytest.raises(bundle.BundleError, match="manifest.json is not valid JSON"):
        tb_nanwatch.load_bundle(tmp_path)
    with pytest.raises(bundle.BundleError, match="manifest.json is not valid JSON"):
        bundle.describe(tmp_path)
    good["batch"]["arrays"].append({"name": "sample_weight", "key": "9", "shape": [2]})
    manifest.write_text(json.dumps(good))
    with pytest.raises(bundle.BundleError, match="batch.npz has no array '9' \\(sample_weight\\)"):
        tb_nanwatch.load_bundle(tmp_path)
    (tmp_path / "nanwatch_bundle" / "manifest.json").unlink()
    with pytest.raises(bundle.BundleError, match="incomplete: manifest.json is missing"):
        tb_nanwatch.load_bundle(tmp_path)
