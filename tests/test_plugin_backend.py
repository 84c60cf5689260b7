"""The plugin's routes through TensorBoard's own WSGI app and a real data provider.

EventMultiplexer (sized the way `--load_fast=false` sizes it, after our loader's
fix_flags) -> MultiplexerDataProvider -> TBContext -> TensorBoardWSGI -> werkzeug Client,
over logdirs written through the real record format.
"""

import base64
import json
import time

import numpy as np
import plugin_helpers
import pytest
import synthetic
from tensorboard import program
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester, plugin_event_multiplexer
from tensorboard.backend.event_processing import data_provider as tb_data_provider
from tensorboard.plugins import base_plugin
from tensorboard.plugins.core import core_plugin
from werkzeug import test as werkzeug_test

from tb_nanwatch import cache, diagnosis, heatmap, plugin, reader, stats, summary

COL = stats.STAT_INDEX
PREFIX = "/data/plugin/nanwatch"
MLP_FIRST = (5003, 12, "posinf")


def configure(*argv, **kwargs):
    """TensorBoard's own flag parsing with the core loader and ours (runs fix_flags)."""
    tb = program.TensorBoard(plugins=[core_plugin.CorePluginLoader(), plugin.NanWatchLoader()])
    tb.configure(argv=["tensorboard"] + list(argv), **kwargs)
    return tb.flags


class App:
    def __init__(self, logdir):
        flags = configure("--logdir", str(logdir), "--load_fast=false")
        # As data_ingester.LocalDataIngester sizes the multiplexer from the flags.
        guidance = dict(data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE)
        guidance.update(flags.samples_per_plugin)
        self.multiplexer = plugin_event_multiplexer.EventMultiplexer(
            size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
            tensor_size_guidance=guidance,
            max_reload_threads=1,
        )
        self.multiplexer.AddRunsFromDirectory(str(logdir))
        self.multiplexer.Reload()
        provider = tb_data_provider.MultiplexerDataProvider(self.multiplexer, str(logdir))
        context = base_plugin.TBContext(data_provider=provider, logdir=str(logdir), flags=flags)
        self.plugin = plugin.NanWatchLoader().load(context)
        self.client = werkzeug_test.Client(
            application.TensorBoardWSGI([self.plugin], data_provider=provider)
        )

    def get(self, path, **params):
        query = "&".join("%s=%s" % kv for kv in params.items())
        return self.client.get(PREFIX + path + ("?" + query if query else ""))

    def json(self, path, **params):
        r = self.get(path, **params)
        assert r.status_code == 200, (path, params, r.status_code, r.get_data(as_text=True))
        return json.loads(r.get_data())


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("backend")
    synthetic.write_run(str(d / "mlp"), n_rows=1000, log_every=10, first=MLP_FIRST)
    synthetic.write_run(str(d / "clean"), n_rows=30, log_every=5, loss=lambda s: 1 / (1 + s))
    plugin_helpers.write_spikes_run(str(d / "spikes"))
    # A run with two site lists: the default one and the group "tower_b".
    synthetic.write_run(str(d / "two_towers"), n_rows=10, log_every=1)
    tower = synthetic.sites_for(("tower_b_dense",))
    with summary.RecordWriter(str(d / "two_towers"), tower, group="tower_b") as writer:
        for step in range(7):
            writer.write_row(step, synthetic.finite_row(len(tower), step))
    return d


@pytest.fixture(scope="module")
def app(logdir):
    return App(logdir)


def decode(hm):
    n, c = hm["n_rows"], hm["n_columns"]
    values = np.frombuffer(base64.b64decode(hm["values"]), dtype="<f4").reshape(n, c)
    status = np.frombuffer(base64.b64decode(hm["status"]), dtype=np.uint8).reshape(n, c)
    return values, status


# -- loader ------------------------------------------------------------------------
def test_fix_flags_keeps_every_record_by_default(tmp_path):
    assert configure("--logdir", str(tmp_path)).samples_per_plugin == {"nanwatch": 0}


def test_fix_flags_explicit_value_wins(tmp_path):
    flags = configure("--logdir", str(tmp_path), "--samples_per_plugin", "images=3,nanwatch=10")
    assert flags.samples_per_plugin == {"images": 3, "nanwatch": 10}


def test_fix_flags_string_and_missing_forms(tmp_path):
    # configure(**kwargs) sets the raw string, bypassing argparse's parser.
    assert configure(
        logdir=str(tmp_path), samples_per_plugin="nanwatch=7,images=2"
    ).samples_per_plugin == {"nanwatch": 7, "images": 2}
    assert configure(logdir=str(tmp_path), samples_per_plugin="images=2").samples_per_plugin == {
        "nanwatch": 0,
        "images": 2,
    }

    class Flags:
        samples_per_plugin = None

    flags = Flags()
    plugin.NanWatchLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"nanwatch": 0}


def test_every_row_is_read(app):
    hm = app.json("/heatmap", rows="sites", run="mlp", columns=5000)
    # 1,000 logged rows and 8 flight rows, one timeline with no gap and no overlap.
    assert hm["step_range"]["rows"] == 1000 and hm["n_columns"] == 1008
    assert hm["first_steps"][0] == 0 and hm["last_steps"][-1] == 9999
    assert all(b == a + 1 for a, b in zip(hm["last_steps"], hm["first_steps"][1:]))


# -- listing, metadata, static files --------------------------------------------------
def test_plugins_listing(app):
    r = app.client.get("/data/plugins_listing")
    listing = json.loads(r.get_data())["nanwatch"]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "NanWatch"
    assert listing["loading_mechanism"] == {
        "type": "IFRAME",
        "module_path": "/data/plugin/nanwatch/index.js",
    }


@pytest.mark.parametrize("name,content_type", sorted(plugin.STATIC_FILES.items()))
def test_static_files(app, name, content_type):
    r = app.get("/" + name)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == content_type
    assert len(r.get_data()) > 100


def test_index_exports_render(app):
    assert "export async function render" in app.get("/index.js").get_data(as_text=True)


@pytest.mark.parametrize(
    "path",
    [
        "/plugin.py",
        "/../plugin.py",
        "/%2e%2e/setup.py",
        "/frontend/index.js",
        "/index.js/../../setup.py",
        "/..%2f..%2fsetup.py",
        "/index.html",
        "/",
    ],
)
def test_static_allow_list(app, path):
    r = app.client.get(PREFIX + path)
    assert r.status_code == 404, path
    assert b"import" not in r.get_data() and b"def " not in r.get_data()


def test_info_is_the_stats_table(app):
    info = app.json("/info")
    table = stats.table_as_json()
    assert info["stats"] == table["stats"]
    assert info["kinds"] == table["kinds"]
    assert info["status"] == table["status"]
    # One colour per status but "finite" (the ramp), the same as report --png's.
    assert info["status_colours"] == {k: list(v) for k, v in stats.STATUS_COLOURS.items()}
    assert set(info["status_colours"]) == set(stats.STATUS_NAMES) - {"finite"}
    assert len({tuple(c) for c in info["status_colours"].values()}) == len(info["status_colours"])


def test_runs_and_groups(app):
    assert app.json("/runs") == ["clean", "mlp", "spikes", "two_towers"]
    assert app.json("/groups") == {
        "clean": [None],
        "mlp": [None],
        "spikes": [None],
        "two_towers": [None, "tower_b"],
    }
    default = app.json("/heatmap", rows="sites", run="two_towers")
    tower = app.json("/heatmap", rows="sites", run="two_towers", group="tower_b")
    assert (default["group"], default["n_columns"], default["n_sites"]) == (
        None,
        10,
        len(synthetic.sites_for()),
    )
    assert (tower["group"], tower["n_columns"], tower["n_sites"]) == (
        "tower_b",
        7,
        len(synthetic.sites_for(("x",))),
    )
    assert tower["sites"][1]["layer"] == "tower_b_dense"
    assert app.json("/cell", run="two_towers", group="tower_b", site=1)["rows"] == 7


def test_newer_record_version_is_refused_in_words(tmp_path):
    """Logs written by a newer tb_nanwatch: 422 with a message, not a 500."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    from tb_nanwatch import metadata

    sites = synthetic.sites_for()
    meta = metadata.create_summary_metadata("rows", sites=sites, stat_names=stats.STAT_NAMES)
    content = json.loads(meta.plugin_data.content)
    content["version"] = metadata.PROTOCOL_VERSION + 1
    meta.plugin_data.content = json.dumps(content).encode()
    writer = EventFileWriter(str(tmp_path / "future"))
    value = summary_pb2.Summary.Value(
        tag="nanwatch/rows",
        metadata=meta,
        tensor=tensor_util.make_tensor_proto(synthetic.finite_row(len(sites), 0)),
    )
    writer.add_event(
        event_pb2.Event(step=0, wall_time=1.0, summary=summary_pb2.Summary(value=[value]))
    )
    writer.close()
    future = App(tmp_path)
    assert future.json("/runs") == ["future"]
    r = future.get("/heatmap", run="future")
    assert r.status_code == 422
    assert "upgrade tb_nanwatch" in json.loads(r.get_data())["error"]


# -- first non-finite ---------------------------------------------------------------
def test_first_nonfinite_is_the_reader_contract(app, logdir):
    got = app.json("/first_nonfinite", run="mlp")
    provider, ctx, eid = reader.open_logdir(str(logdir))
    assert got == reader.first_nonfinite_json(reader.read_run(provider, ctx, eid, "mlp"))
    sites = synthetic.sites_for()
    assert (got["step"], got["layer"], got["kind"], got["tensor"]) == (
        5003,
        sites[12]["layer"],
        sites[12]["kind"],
        sites[12]["tensor"],
    )
    assert (got["nan"], got["posinf"], got["neginf"]) == (0, 3, 0)
    assert len(got["propagators"]) == len(sites) - 13


def test_first_nonfinite_null_for_a_finite_run(app):
    r = app.get("/first_nonfinite", run="clean")
    assert r.status_code == 200 and json.loads(r.get_data()) is None


def test_first_nonfinite_from_rows_when_no_record(app):
    # The spikes run has no first_nonfinite record: the reader falls back to the rows.
    got = app.json("/first_nonfinite", run="spikes")
    assert got["step"] == (plugin_helpers.SPIKE_NEGINF[0] + 1) * 10 - 1
    assert got["neginf"] == 1


# -- heatmap ------------------------------------------------------------------------
def test_heatmap_full_resolution_matches_written_rows(app, logdir):
    hm = app.json("/heatmap", rows="sites", run="mlp", stat="max_abs", columns=1010)
    values, status = decode(hm)
    provider, ctx, eid = reader.open_logdir(str(logdir))
    data = reader.read_run(provider, ctx, eid, "mlp")
    # Logged rows every 10 steps; the flight recorder's steps 4996-5003 stand in the
    # timeline at step resolution, the logged rows around them shown for the rest.
    logged = [i for i, s in enumerate(data.steps) if not 4990 <= s <= 5009]
    columns = [i for i, s in enumerate(hm["last_steps"]) if not 4990 <= s <= 5009]
    np.testing.assert_allclose(
        values[:, columns], data.rows[logged, :, COL["max_abs"]].T.astype(np.float32), rtol=1e-6
    )
    np.testing.assert_array_equal(status[:, columns], stats.nonfinite_status(data.rows[logged]).T)
    assert hm["last_steps"][497:511] == [4979, 4989, 4995] + list(range(4996, 5004)) + [
        5009,
        5019,
        5029,
    ]
    assert hm["first_steps"][499:509] == [4990] + list(range(4996, 5004)) + [5004]
    assert [s["label"] for s in hm["sites"]] == data.labels
    # The first non-finite step has a column of its own, the steps before it too.
    assert hm["first_nonfinite_cell"] == {"row": 12, "column": 507, "site": 12, "step": 5003}
    assert status[12, 506] == 0 and status[12, 507] == 2 and status[11, 507] == 0
    assert hm["step_range"] == {"first": 0, "last": 9999, "rows": 1000}
    assert hm["flight_range"] == {"first": 4996, "last": 5003, "rows": 8}


def test_heatmap_downsampling_never_averages_a_spike_away(app):
    rows = np.stack([r for _, r in plugin_helpers.spikes_rows(len(synthetic.sites_for()))])
    hm = app.json("/heatmap", rows="sites", run="spikes", stat="max_abs", columns=50)
    values, status = decode(hm)
    edges = np.cumsum([0] + hm["rows_per_column"])
    assert hm["n_columns"] == 50 and edges[-1] == len(rows)
    assert hm["first_steps"][0] == 0 and hm["last_steps"][-1] == 9999
    assert all(b == a + 1 for a, b in zip(hm["last_steps"], hm["first_steps"][1:]))  # no gaps
    (nan_row, nan_site), (neg_row, neg_site) = plugin_helpers.SPIKE_NAN, plugin_helpers.SPIKE_NEGINF
    column = lambda row: int(np.searchsorted(edges, row, side="right") - 1)
    # The first non-finite row (the -Inf: no record, so from the rows) is a column of its own.
    assert hm["rows_per_column"][column(neg_row)] == 1
    assert hm["first_nonfinite_cell"]["column"] == column(neg_row)
    expected = np.zeros_like(status)
    expected[nan_site, column(nan_row)] = 1
    expected[neg_site, column(neg_row)] = 3
    np.testing.assert_array_equal(status, expected)
    # max_abs aggregates by max, not by mean.
    binned_max = np.stack(
        [rows[a:b, :, COL["max_abs"]].max(axis=0) for a, b in zip(edges, edges[1:])], 1
    )
    binned_mean = np.stack(
        [rows[a:b, :, COL["max_abs"]].mean(axis=0) for a, b in zip(edges, edges[1:])], 1
    )
    np.testing.assert_allclose(values, binned_max.astype(np.float32), rtol=1e-6)
    assert not np.allclose(values, binned_mean, rtol=1e-3)
    # Counts are summed over the bin.
    counts, _ = decode(app.json("/heatmap", rows="sites", run="spikes", stat="nan", columns=50))
    assert counts[nan_site, column(nan_row)] == 1 and counts.sum() == 1


def test_heatmap_kind_filter_keeps_model_order(app):
    hm = app.json("/heatmap", rows="sites", run="mlp", kind="weight_grad", columns=10)
    sites = synthetic.sites_for()
    want = [i for i, s in enumerate(sites) if s["kind"] == "weight_grad"]
    assert [s["index"] for s in hm["sites"]] == want
    assert hm["first_nonfinite_cell"]["row"] == want.index(12)
    assert (
        app.json("/heatmap", rows="sites", run="mlp", kind="activation", columns=10)[
            "first_nonfinite_cell"
        ]
        is None
    )


def test_heatmap_zoom_to_a_step_range(app):
    hm = app.json("/heatmap", rows="sites", run="mlp", first_step=4990, last_step=5019, columns=500)
    flight = list(range(4996, 5004))
    assert hm["first_steps"] == [4990] + flight + [5004, 5010]
    assert hm["last_steps"] == [4995] + flight + [5009, 5019]
    _, status = decode(hm)
    assert list(status[12]) == [0] * 8 + [2, 2, 2]
    assert hm["first_nonfinite_cell"]["column"] == 8


def test_heatmap_flight_recorder_is_step_resolution(app):
    hm = app.json("/heatmap", rows="sites", run="mlp", source="flight", columns=500)
    assert hm["first_steps"] == hm["last_steps"] == list(range(4996, 5004))
    _, status = decode(hm)
    assert status[:, :7].max() == 0 and list(status[12:, 7]) == [2] * (hm["n_sites"] - 12)
    assert hm["first_nonfinite_cell"] == {"row": 12, "column": 7, "site": 12, "step": 5003}


def test_heatmap_every_stat_and_kind_answers(app):
    for stat in stats.STAT_NAMES:
        assert app.json("/heatmap", rows="sites", run="mlp", stat=stat, columns=20)["stat"] == stat
    for kind in stats.KINDS + ("all",):
        assert (
            app.json("/heatmap", rows="sites", run="clean", kind=kind, columns=20)["kind"] == kind
        )


def test_heatmap_latency(app):
    def timed(**params):
        t0 = time.perf_counter()
        app.json("/heatmap", rows="sites", run="mlp", columns=500, **params)
        return time.perf_counter() - t0

    app.plugin.cache = cache.RunCache()
    cold = timed()  # reads the run
    built = min(timed(stat=s) for s in ("norm", "std", "mean"))  # run cached, heatmap built
    cached = min(timed() for _ in range(3))  # the same view again
    print(
        "\nheatmap route, 1,000 rows x 32 sites -> 500 columns: cold %.1f ms, built %.1f ms, cached %.1f ms"
        % (cold * 1e3, built * 1e3, cached * 1e3)
    )
    assert cached < built < cold < 5


def test_heatmap_cache_follows_new_data(app):
    # The cached answer belongs to one version of the run: a different run answers its own.
    a = app.json("/heatmap", rows="sites", run="clean", columns=500)
    b = app.json("/heatmap", rows="sites", run="spikes", columns=500)
    assert (a["run"], a["n_columns"]) == ("clean", 30) and (b["run"], b["n_columns"]) == (
        "spikes",
        500,
    )


# -- cell ---------------------------------------------------------------------------
def test_cell_aggregates_every_statistic(app, logdir):
    provider, ctx, eid = reader.open_logdir(str(logdir))
    data = reader.read_run(provider, ctx, eid, "mlp")
    cell = app.json("/cell", run="mlp", site=12, first_step=4980, last_step=5019)
    # 4 logged rows, 8 flight rows in place of the steps they cover.
    assert cell["rows"] == 12 and cell["steps"] == [4980, 5019]
    assert cell["status"] == "+inf"
    expected = stats.aggregate_rows(data.rows[498:502, 12, :])
    for k, name in enumerate(stats.STAT_NAMES):
        if name in ("mean", "std"):  # weighted by the steps each row is shown for
            continue
        if np.isnan(expected[k]):
            assert cell["stats"][name] is None, name
        else:
            assert cell["stats"][name] == pytest.approx(expected[k]), name
    assert (
        cell["stats"]["posinf"] == 3 * 7 + 3 * 10
    )  # steps 5003-5009 and 5010-5019: summed, never averaged
    assert cell["site"]["label"] == summary.site_label(synthetic.sites_for()[12])
    assert [r["step"] for r in cell["flight"]] == list(range(4996, 5004))
    assert cell["flight"][-1]["posinf"] == 3 and cell["flight"][0]["posinf"] == 0


def test_cell_flight_source(app):
    cell = app.json("/cell", run="mlp", site=12, first_step=5003, last_step=5003, source="flight")
    assert cell["rows"] == 1 and cell["status"] == "+inf" and cell["stats"]["steps"] == 1


def test_cell_outside_data(app):
    cell = app.json("/cell", run="clean", site=0, first_step=10**9, last_step=10**9 + 1)
    assert cell["rows"] == 0 and cell["stats"] is None and cell["flight"] == []


# -- errors: 400 with a message, 404 for unknown runs, never 500 --------------------------
@pytest.mark.parametrize(
    "path,params,code",
    [
        ("/heatmap", {}, 400),
        ("/heatmap", {"run": "mlp", "columns": "abc"}, 400),
        ("/heatmap", {"run": "mlp", "columns": "1.5"}, 400),
        ("/heatmap", {"run": "mlp", "columns": "-3"}, 400),
        ("/heatmap", {"run": "mlp", "columns": "0"}, 400),
        ("/heatmap", {"run": "mlp", "columns": "10000000000000000000000"}, 400),
        ("/heatmap", {"run": "mlp", "stat": "bogus"}, 400),
        ("/heatmap", {"run": "mlp", "kind": "bogus"}, 400),
        ("/heatmap", {"run": "mlp", "source": "bogus"}, 400),
        ("/heatmap", {"run": "mlp", "first_step": "x"}, 400),
        ("/heatmap", {"run": "mlp", "first_step": "-1"}, 400),
        ("/heatmap", {"run": "mlp", "first_step": "20", "last_step": "10"}, 400),
        ("/heatmap", {"run": "nope"}, 404),
        ("/heatmap", {"run": "mlp", "group": "nope"}, 404),
        ("/first_nonfinite", {}, 400),
        ("/first_nonfinite", {"run": "nope"}, 404),
        ("/cell", {"run": "mlp"}, 400),
        ("/cell", {"run": "mlp", "site": "x"}, 400),
        ("/cell", {"run": "mlp", "site": "-1"}, 400),
        ("/cell", {"run": "mlp", "site": "999"}, 400),
        ("/cell", {"run": "mlp", "site": "1", "last_step": "zz"}, 400),
        ("/cell", {"run": "mlp", "site": "1", "source": "bogus"}, 400),
        ("/cell", {"run": "nope", "site": "1"}, 404),
        ("/precursors", {}, 400),
        ("/precursors", {"run": "nope"}, 404),
    ],
)
def test_bad_requests(app, path, params, code):
    r = app.get(path, **params)
    assert r.status_code == code, r.get_data(as_text=True)
    message = json.loads(r.get_data())["error"]
    assert isinstance(message, str) and len(message) > 10


def test_empty_range_is_not_an_error(app):
    hm = app.json("/heatmap", rows="sites", run="mlp", first_step=10**12)
    assert hm["n_columns"] == 0 and hm["first_steps"] == [] and hm["values"] == ""


# -- mixed precision: loss-scale skips, warning signs, tf.distribute --------------------------
# Steps the LossScaleOptimizer skipped (gradients overflowed) -> loss scale after the skip.
MP_SKIPS = {0: 16384.0, 1: 8192.0, 2: 4096.0, 153: 2048.0, 281: 1024.0}
MP_COLLAPSE = 299
MP_FIRST = 205  # the "worker" run: dense_2's float16 output overflows at this step


def write_mixed_precision(logdir, first=False):
    """40 rows of 10 steps.  dense's Adam velocity is float16 and below its smallest normal
    in the first three rows (underflow); the gradient sites hold +Inf in the rows of the
    skipped steps.  With `first`: dense_2's float16 output comes within half a doubling of
    float16's largest value from step 150 and overflows at MP_FIRST on worker_1's replica 3."""
    sites = synthetic.sites_for()
    vel = next(
        i for i, s in enumerate(sites) if (s["layer"], s["tensor"]) == ("dense", "velocity/kernel")
    )
    act = next(
        i for i, s in enumerate(sites) if (s["layer"], s["kind"]) == ("dense_2", "activation")
    )
    sites[vel]["dtype"] = sites[act]["dtype"] = "float16"
    grads = [i for i, s in enumerate(sites) if s["kind"] in ("activation_grad", "weight_grad")]
    total = 0
    with summary.RecordWriter(logdir, sites) as writer:
        for r in range(40):
            start, step = r * 10, r * 10 + 9
            row = synthetic.finite_row(len(sites), step, steps=10)
            row[vel, COL["underflow_frac"]] = 1.0 if step < 30 else 0.5
            skipped = sorted(s for s in MP_SKIPS if start <= s <= step)
            for s in skipped:
                total += 1
                writer.write_events(
                    s,
                    [
                        {
                            "type": "loss_scale_skip",
                            "step": s,
                            "skips_total": total,
                            "new_skips": 1,
                            "loss_scale": MP_SKIPS[s],
                        }
                    ],
                )
            if skipped:
                row[grads, COL["posinf"]] = 5 * len(skipped)
                row[grads, COL["nonfinite_steps"]] = len(skipped)
                row[grads, COL["first_nonfinite_step"]] = skipped[0]
            if first and step >= 150:
                row[act, COL["headroom"]] = 0.5
            if first and step >= MP_FIRST:
                row[act:, COL["posinf"]] = 2
                row[act:, COL["nonfinite_steps"]] = 1
                row[act:, COL["first_nonfinite_step"]] = max(start, MP_FIRST)
            if step == MP_COLLAPSE:
                writer.write_events(
                    step, [{"type": "loss_scale_collapse", "step": step, "loss_scale": 0.5}]
                )
            writer.write_row(step, row)
            if first and start <= MP_FIRST <= step:
                writer.write_first_nonfinite(
                    MP_FIRST,
                    dict(
                        layer="dense_2",
                        kind="activation",
                        tensor="",
                        site=act,
                        nan=0,
                        posinf=2,
                        neginf=0,
                        propagators=[],
                        replica=3,
                        replicas=[3],
                        worker="worker_1",
                        loss_scale_skips_before=4,
                    ),
                )
    return sites, vel, act, grads


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    write_mixed_precision(str(d / "mp"))
    write_mixed_precision(str(d / "mp_worker"), first=True)
    return App(d), d


def test_heatmap_events_are_the_skips_in_view(mixed):
    app, _ = mixed
    hm = app.json("/heatmap", rows="sites", run="mp", columns=500)
    skips = [e for e in hm["events"] if e["type"] == "loss_scale_skip"]
    assert [e["step"] for e in skips] == sorted(MP_SKIPS)
    assert [e["column"] for e in skips] == [0, 0, 0, 15, 28]
    assert [e["loss_scale"] for e in skips] == [MP_SKIPS[s] for s in sorted(MP_SKIPS)]
    assert skips[-1]["skips_total"] == 5 and skips[-1]["new_skips"] == 1
    (collapse,) = [e for e in hm["events"] if e["type"] == "loss_scale_collapse"]
    assert (collapse["step"], collapse["column"], collapse["loss_scale"]) == (MP_COLLAPSE, 29, 0.5)
    for e in hm["events"]:
        assert hm["first_steps"][e["column"]] <= e["step"] <= hm["last_steps"][e["column"]]
    # The gradients of those columns are non-finite (what the skip markers explain), yet the
    # run has no first non-finite value.
    _, status = decode(hm)
    assert app.json("/first_nonfinite", run="mp") is None
    grad_rows = [
        i for i, s in enumerate(hm["sites"]) if s["kind"] in ("activation_grad", "weight_grad")
    ]
    assert (status[grad_rows][:, [0, 15, 28]] == 2).all() and status[:, 1].max() == 0
    # Whole-run totals for the banner, whatever the view.
    counts = {c["type"]: c for c in hm["event_counts"]}
    assert (
        counts["loss_scale_skip"]["count"] == 5
        and counts["loss_scale_skip"]["last"]["loss_scale"] == 1024.0
    )
    assert (counts["loss_scale_skip"]["first_step"], counts["loss_scale_skip"]["last_step"]) == (
        0,
        281,
    )
    assert counts["loss_scale_collapse"]["count"] == 1


def test_heatmap_events_follow_the_step_range_and_binning(mixed):
    app, _ = mixed
    zoom = app.json("/heatmap", rows="sites", run="mp", first_step=100, last_step=199, columns=500)
    assert [(e["type"], e["step"], e["column"]) for e in zoom["events"]] == [
        ("loss_scale_skip", 153, 5)
    ]
    assert {c["type"]: c["count"] for c in zoom["event_counts"]}["loss_scale_skip"] == 5
    binned = app.json(
        "/heatmap", rows="sites", run="mp", columns=4
    )  # 10 rows, 100 steps per column
    assert [(e["step"], e["column"]) for e in binned["events"]] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (153, 1),
        (281, 2),
        (MP_COLLAPSE, 2),
    ]
    assert (
        app.json("/heatmap", rows="sites", run="mp", first_step=300, last_step=399)["events"] == []
    )
    assert app.json("/heatmap", rows="sites", run="mp", source="flight")["events"] == []


def test_events_past_the_limit_are_merged_per_column(monkeypatch):
    monkeypatch.setattr(plugin, "MAX_EVENTS", 3)
    hm = heatmap.Heatmap(
        [0],
        ["x"],
        np.array([0, 10]),
        np.array([9, 19]),
        np.zeros((1, 2)),
        np.zeros((1, 2), np.uint8),
    )
    events = [{"type": "loss_scale_skip", "step": s} for s in (3, 1, 2, 12, 25)] + ["not a dict"]
    got = plugin._events_in_view(events, hm)
    assert [(e["step"], e["column"], e.get("merged")) for e in got] == [(3, 0, 3), (12, 1, 1)]
    assert [e["step"] for e in plugin._events_in_view(events[:3], hm)] == [
        1,
        2,
        3,
    ]  # at the limit: all


def test_precursors_route(mixed):
    app, d = mixed
    got = app.json("/precursors", run="mp")
    provider, ctx, eid = reader.open_logdir(str(d))
    assert got == diagnosis.precursors(reader.read_run(provider, ctx, eid, "mp"))
    assert got == [
        {
            "step": 9,
            "layer": "dense",
            "kind": "optimizer_state",
            "tensor": "velocity/kernel",
            "sign": "underflow",
            "value": 1.0,
            "text": "100% of dense/optimizer_state/velocity/kernel below float16's smallest normal"
            " value (underflow)",
        }
    ]
    # Up to the first non-finite step only; the overflow risk of dense_2's float16 output too.
    worker = app.json("/precursors", run="mp_worker")
    assert worker == diagnosis.precursors(reader.read_run(provider, ctx, eid, "mp_worker"))
    assert [(p["step"], p["layer"], p["sign"]) for p in worker] == [
        (9, "dense", "underflow"),
        (159, "dense_2", "overflow_risk"),
    ]
    assert (
        worker[1]["text"]
        == "dense_2/activation within 0.5 doublings of float16's largest finite value"
    )


def test_precursors_of_a_big_run_cost_what_their_signs_cost(app):
    # 1,000 rows x 32 sites without a sign: diagnosis.precursors alone takes ~1 s here.
    app.plugin.cache = cache.RunCache()
    app.json("/heatmap", rows="sites", run="spikes", columns=10)  # reads the run
    t0 = time.perf_counter()
    assert app.json("/precursors", run="spikes") == []
    assert time.perf_counter() - t0 < 0.3


def test_first_nonfinite_names_worker_and_replica(mixed):
    app, _ = mixed
    first = app.json("/first_nonfinite", run="mp_worker")
    assert (first["step"], first["layer"], first["kind"]) == (MP_FIRST, "dense_2", "activation")
    assert (first["worker"], first["replica"], first["replicas"]) == ("worker_1", 3, [3])
    hm = app.json("/heatmap", rows="sites", run="mp_worker", columns=500)
    assert hm["first_nonfinite_cell"]["column"] == 20


# -- a live run: a reload shows new rows ---------------------------------------------------
def test_reload_shows_new_rows(tmp_path):
    synthetic.write_run(str(tmp_path / "live"), n_rows=20, log_every=10)
    live = App(tmp_path)
    assert live.json("/heatmap", rows="sites", run="live", columns=500)["n_columns"] == 20
    assert live.json("/first_nonfinite", run="live") is None
    # Training goes on, in a second event file of the same run, and blows up.
    sites = synthetic.sites_for()
    with summary.RecordWriter(str(tmp_path / "live"), sites) as writer:
        for i in range(20, 30):
            step = (i + 1) * 10 - 1
            row = synthetic.finite_row(len(sites), step, steps=10)
            if i == 25:
                row[4, COL["nan"]] = 2
                row[4, COL["nonfinite_steps"]] = 1
                row[4, COL["first_nonfinite_step"]] = 253
            writer.write_row(step, row)
    live.multiplexer.Reload()
    hm = live.json("/heatmap", rows="sites", run="live", columns=500)
    assert hm["n_columns"] == 30
    assert decode(hm)[1][4, 25] == 1
    assert live.json("/first_nonfinite", run="live")["step"] == 253


# -- the real writer ----------------------------------------------------------------------
def test_real_callback_logdir(tmp_path):
    """A tiny Keras model trained by model.fit with NanWatchCallback on data holding a NaN
    in a known batch: /first_nonfinite names the input at that step."""
    tf = pytest.importorskip("tensorflow")
    import tb_nanwatch

    x = np.random.RandomState(0).normal(size=(64, 4)).astype("float32")
    y = np.random.RandomState(1).normal(size=(64, 1)).astype("float32")
    bad_batch = 5
    x[bad_batch * 8 + 3, 2] = np.nan
    model = tf.keras.Sequential(
        [
            tf.keras.Input((4,)),
            tf.keras.layers.Dense(3, name="hidden"),
            tf.keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[tb_nanwatch.NanWatchCallback(str(tmp_path / "fit"), log_every=2)],
    )
    real = App(tmp_path)
    first = real.json("/first_nonfinite", run=real.json("/runs")[0])
    assert first["step"] == bad_batch, first
    assert first["kind"] == "input" and first["nan"] == 1, first
    assert {"hidden", "out"} <= {
        p["layer"] for p in first["propagators"] if p["kind"] == "activation"
    }, first
    hm = real.json("/heatmap", rows="sites", run=real.json("/runs")[0], columns=500)
    assert (
        hm["first_nonfinite_cell"] is not None and hm["first_nonfinite_cell"]["step"] == bad_batch
    )


def test_rows_spread_over_step_blocks_are_all_read(tmp_path, monkeypatch):
    """Rows go to one tag per step block so that no data-provider answer nears gRPC's 256 MiB
    limit (RustBoard); the reader and the plugin see every block, and a new block is new data."""
    from tb_nanwatch import metadata as md

    row_bytes = (
        (len(synthetic.sites_for()) + 1) * len(md.DISK_STATS) * np.dtype(md.DISK_DTYPE).itemsize
    )
    monkeypatch.setattr(md, "BLOCK_BYTES", 40 * row_bytes)  # 40 rows
    synthetic.write_run(str(tmp_path / "big"), n_rows=130, log_every=10, first=(1003, 4, "nan"))
    provider, ctx, eid = reader.open_logdir(str(tmp_path))
    tags = reader.run_series(provider, ctx, eid, "big")
    assert sorted(t for t in tags if t.startswith("nanwatch/rows")) == [
        "nanwatch/rows",
        "nanwatch/rows.0001",
        "nanwatch/rows.0002",
        "nanwatch/rows.0003",
    ]
    rd = reader.read_run(provider, ctx, eid, "big")
    assert rd.steps.tolist() == [10 * (i + 1) - 1 for i in range(130)]
    assert reader.first_nonfinite_json(rd)["step"] == 1003
    assert reader.list_runs(provider, ctx, eid) == {"big": [None]}


def test_a_failing_data_provider_is_a_json_error_not_an_html_500(app, monkeypatch):
    # What RustBoard's client raises for an answer over gRPC's 256 MiB, for instance.
    def fail(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Received message larger than max")

    monkeypatch.setattr(app.plugin, "cache", cache.RunCache())
    monkeypatch.setattr(app.plugin, "_logdir", None)  # read through the provider
    monkeypatch.setattr(app.plugin._provider, "read_tensors", fail)
    r = app.get("/heatmap", run="mlp", stat="max_abs")
    assert r.status_code == 503
    assert "RESOURCE_EXHAUSTED" in json.loads(r.get_data())["error"]


def test_two_writer_sessions_show_the_latest_one_with_a_warning(tmp_path):
    """Re-running a script into the same run directory: the tab shows the latest session
    only (under the Python loader, which purges a tag's older rows when steps go back, and
    keeps the older session's first record), and says that there were two."""
    run = str(tmp_path / "run1")
    synthetic.write_run(run, n_rows=50, log_every=10, first=(33, 20, "posinf"))
    time.sleep(1.2)
    synthetic.write_run(run, n_rows=20, log_every=10)  # the re-run stayed finite
    app = App(tmp_path)
    assert app.json("/first_nonfinite", run="run1") is None
    hm = app.json("/heatmap", run="run1", columns=500)
    assert "2 writer sessions" in hm["session_warning"] and "latest only" in hm["session_warning"]
    assert hm["step_range"]["rows"] == 20 and hm["flight_range"] is None
    # One session: no warning.
    synthetic.write_run(str(tmp_path / "single"), n_rows=5, log_every=10)
    assert App(tmp_path).json("/heatmap", run="single")["session_warning"] is None


# -- the routes' *_impl methods, called directly --------------------------------------
def test_impl_methods_answer_plain_values_without_a_request(app):
    from tensorboard import context

    ctx, p = context.RequestContext(), app.plugin
    assert p.runs_impl(ctx, "") == app.json("/runs")
    assert p.info_impl() == app.json("/info")
    hm = p.heatmap_impl(ctx, "", "mlp", rows="sites", columns=10)
    assert (hm["run"], hm["n_columns"], hm["rows"]) == ("mlp", 10, None)
    assert (
        p.heatmap_impl(ctx, "", "mlp", rows="sites", columns=10) is hm
    )  # memoised per data version
    cell = p.cell_impl(ctx, "", "mlp", MLP_FIRST[1], first_step=5000, last_step=5009)
    assert cell["status"] == "+inf" and cell["steps"] == [5000, 5009]
    assert p.first_nonfinite_impl(ctx, "", "mlp")["step"] == MLP_FIRST[0]
    for call, error in (
        (lambda: p.heatmap_impl(ctx, "", "mlp", stat="bogus"), plugin._BadRequest),
        (lambda: p.heatmap_impl(ctx, "", "mlp", first_step=9, last_step=3), plugin._BadRequest),
        (lambda: p.cell_impl(ctx, "", "mlp", 10**6), plugin._BadRequest),
        (lambda: p.first_nonfinite_impl(ctx, "", "nope"), reader.RunNotFound),
    ):
        with pytest.raises(error):
            call()


def test_overview_says_finite_not_healthy_when_the_loss_did_not_go_down(tmp_path):
    """A loss stuck at 0.9 is "no_progress" (in words "finite"); a loss from 1 down to 0.5 is
    "healthy"; a run without a loss site cannot show progress: "no_progress".  The same before
    and after the run is opened."""
    synthetic.write_run(str(tmp_path / "stuck"), n_rows=20, log_every=10, loss=lambda s: 0.9)
    synthetic.write_run(
        str(tmp_path / "learning"), n_rows=20, log_every=10, loss=lambda s: 1 - s / 400
    )
    no_loss = [s for s in synthetic.sites_for() if s["kind"] != "loss"]
    with summary.RecordWriter(str(tmp_path / "no_loss"), no_loss, log_every=1) as writer:
        for step in range(5):
            writer.write_row(step, synthetic.finite_row(len(no_loss), step))
    app = App(tmp_path)
    for opened in (False, True):
        states = {r["run"]: r for r in app.json("/overview")}
        assert {r: states[r]["state"] for r in states} == {
            "stuck": "no_progress",
            "learning": "healthy",
            "no_loss": "no_progress",
        }
        stuck = states["stuck"]["loss_progress"]
        assert (stuck["first_step"], stuck["last_step"], stuck["progress"]) == (9, 199, False)
        assert stuck["first"] == pytest.approx(0.9) and stuck["last"] == pytest.approx(0.9)
        assert states["learning"]["loss_progress"]["last"] == pytest.approx(1 - 199 / 400)
        assert states["no_loss"]["loss_progress"] is None
        if not opened:
            for run in states:  # the heatmap reads the rows into the cache
                app.json("/heatmap", run=run)
    info = app.json("/info")
    assert info["run_state_words"]["no_progress"] == "finite"
    assert "did not go down" in info["run_state_meanings"]["no_progress"]


def test_overview_rereads_a_live_finite_run_at_most_once_a_minute(tmp_path, monkeypatch):
    """A live finite run's progress is read again when its rows changed and the last answer is
    older than PROGRESS_MAX_AGE_S; within that age the last answer stands."""
    sites = synthetic.sites_for()

    def write(writer, steps, loss):
        for step in steps:  # one writer session throughout, wall times rising with the steps
            row = synthetic.finite_row(len(sites), step, steps=10)
            synthetic.set_loss(row, sites, loss)
            writer.write_row(step, row, wall_time=1000.0 + step / 100)
        writer.flush()

    with summary.RecordWriter(str(tmp_path / "live"), sites, log_every=10) as writer:
        write(writer, (9, 19, 29, 39, 49), 0.9)
        app = App(tmp_path)
        assert app.json("/overview")[0]["state"] == "no_progress"
        write(writer, (59, 69, 79), 0.1)  # the loss falls
    app.multiplexer.Reload()
    assert app.json("/overview")[0]["last_step"] == 79  # the new rows are seen...
    assert app.json("/overview")[0]["state"] == "no_progress"  # ...not re-read within the minute
    monkeypatch.setattr(plugin, "PROGRESS_MAX_AGE_S", 0.0)
    live = app.json("/overview")[0]
    assert (live["state"], live["loss_progress"]["last"]) == ("healthy", pytest.approx(0.1))


def test_loss_progress_rule():
    sites = [{"kind": "input"}, {"kind": "loss"}]
    rows = np.full((3, 2, len(stats.STATS)), np.nan)
    mean = stats.STAT_INDEX["mean"]
    rows[:, 1, mean] = [1.0, np.nan, 0.96]  # 4% down: not progress
    p = stats.loss_progress(sites, [0, 1, 2], rows)
    assert (p["first"], p["last"], p["progress"]) == (1.0, 0.96, False)
    rows[2, 1, mean] = 0.94
    assert stats.loss_progress(sites, [0, 1, 2], rows)["progress"] is True
    rows[:, 1, mean] = [-1.0, np.nan, -1.2]  # a negative loss going down is progress too
    assert stats.loss_progress(sites, [0, 1, 2], rows)["progress"] is True
    rows[:, 1, mean] = [np.nan, np.nan, 0.1]  # one measured row: cannot tell
    assert stats.loss_progress(sites, [0, 1, 2], rows) is None
    assert stats.loss_progress(sites[:1], [0, 1, 2], rows[:, :1]) is None


def test_one_table_maps_errors_to_statuses():
    codes = {kind: code for kind, code in plugin.ERROR_STATUS}
    assert codes[plugin._BadRequest] == codes[heatmap.HeatmapError] == 400
    assert codes[reader.RunNotFound] == 404 and codes[reader.InvalidData] == 422


def test_overview_lists_every_runs_state(app, mixed):
    states = {(r["run"], r["group"]): r for r in app.json("/overview")}
    assert set(states) == {(run, g) for run, gs in app.json("/groups").items() for g in gs}
    mlp = states[("mlp", None)]
    assert (mlp["state"], mlp["step"], mlp["layer"], mlp["kind"]) == (
        "nonfinite",
        MLP_FIRST[0],
        synthetic.sites_for()[MLP_FIRST[1]]["layer"],
        synthetic.sites_for()[MLP_FIRST[1]]["kind"],
    )
    assert (
        states[("clean", None)]["state"] == "healthy"
        and states[("clean", None)]["last_step"] == 149
    )
    assert states[("clean", None)]["loss_progress"]["progress"] is True
    mixed_app, _ = mixed
    mp = {r["run"]: r for r in mixed_app.json("/overview")}
    assert mp["mp"]["state"] == "skips" and mp["mp"]["loss_scale_skips"] == 5
    assert mp["mp_worker"]["state"] == "nonfinite"
