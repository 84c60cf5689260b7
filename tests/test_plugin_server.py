"""A real `tensorboard` process per loader, over a run of 1,200 logged rows: the plugin is
listed, every row is served (read from the run's files, whatever TensorBoard samples),
`/first_nonfinite` is right, and a live run's new rows show after TensorBoard reloads."""

import shutil

import plugin_helpers
import pytest
import synthetic
from plugin_helpers import get, get_json

from tb_nanwatch import summary

N_ROWS = 1200
LOG_EVERY = 5
FIRST = (3001, 9, "nan")  # step, site index, kind
P = "/data/plugin/nanwatch"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("server_template")
    synthetic.write_run(str(d / "big"), n_rows=N_ROWS, log_every=LOG_EVERY, first=FIRST)
    return d


@pytest.fixture
def logdir(template, tmp_path):
    d = tmp_path / "logs"
    shutil.copytree(template, d)
    return d


def served_rows(base, run="big"):
    """(logged rows the heatmap covers, the heatmap)."""
    hm = get_json(base + P + "/heatmap?run=%s&columns=5000" % run)
    return hm["step_range"]["rows"], hm


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_every_row_served_and_live_reload(logdir, load_fast):
    with plugin_helpers.tensorboard(
        logdir, "--load_fast=%s" % load_fast, "--reload_interval=1"
    ) as base:
        listing = get_json(base + "/data/plugins_listing")["nanwatch"]
        assert listing["enabled"] and listing["tab_name"] == "NanWatch"
        assert listing["loading_mechanism"]["module_path"] == P + "/index.js"
        status, body = get(base + P + "/index.js")
        assert status == 200 and b"export async function render" in body

        # RustBoard may still be loading the file when it first answers.
        rows, hm = plugin_helpers.wait_for(
            lambda: (lambda r: r if r[0] == N_ROWS else None)(served_rows(base)),
            60,
            what="all rows",
        )
        assert hm["first_steps"][0] == 0 and hm["last_steps"][-1] == N_ROWS * LOG_EVERY - 1
        assert get_json(base + P + "/runs") == ["big"]

        first = get_json(base + P + "/first_nonfinite?run=big")
        site = synthetic.sites_for()[FIRST[1]]
        assert (first["step"], first["layer"], first["kind"], first["tensor"]) == (
            FIRST[0],
            site["layer"],
            site["kind"],
            site["tensor"],
        )
        assert first["nan"] == 3 and first["posinf"] == 0
        assert hm["first_nonfinite_cell"]["site"] == FIRST[1]

        status, body = get(base + P + "/heatmap?run=big&columns=abc")
        assert status == 400 and b"columns" in body
        assert get(base + P + "/heatmap?run=nope")[0] == 404

        # Training goes on: 40 more rows in a new event file of the same run.
        sites = synthetic.sites_for()
        with summary.RecordWriter(str(logdir / "big"), sites) as writer:
            for i in range(N_ROWS, N_ROWS + 40):
                step = (i + 1) * LOG_EVERY - 1
                writer.write_row(step, synthetic.finite_row(len(sites), step, steps=LOG_EVERY))
        plugin_helpers.wait_for(
            lambda: served_rows(base)[0] == N_ROWS + 40, 60, what="the new rows"
        )


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_samples_per_plugin_does_not_thin_the_rows(logdir, load_fast):
    """Rows are read from the run's own files, not from what TensorBoard keeps: a user's
    `--samples_per_plugin nanwatch=10` leaves TensorBoard's memory small and every row in
    the tab."""
    with plugin_helpers.tensorboard(
        logdir, "--load_fast=%s" % load_fast, "--samples_per_plugin", "nanwatch=10"
    ) as base:
        last = N_ROWS * LOG_EVERY - 1

        def loaded():  # both loaders' reservoirs always keep the last record read
            if get(base + P + "/runs")[1] != b'["big"]':
                return None
            rows, hm = served_rows(base)
            return (rows, hm) if hm["last_steps"] and hm["last_steps"][-1] == last else None

        rows, hm = plugin_helpers.wait_for(loaded, 60, what="the whole run")
        assert rows == N_ROWS
        assert get_json(base + P + "/first_nonfinite?run=big")["step"] == FIRST[0]
