"""Damaged and hostile runs in the NanWatch tab (headless Chromium, a real TensorBoard).

A run killed before its first row shows its first non-finite record; records the
reader's gate dropped are said in the banner; a run none of whose records can be read
shows the plugin's 422 message.  Screenshots: docs/damaged_<run>_<w>x<h>.png.
"""

import json
import pathlib

import damage_helpers as dh
import numpy as np
import pytest
import synthetic
from tensorboard.util import tensor_util
from test_frontend import Tab, browser, plugin_helpers  # noqa: F401,F811 (browser: the shared fixture)

from tb_nanwatch import metadata, summary

sync_api = pytest.importorskip("playwright.sync_api")

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
SITES = synthetic.sites_for()
ROWS = metadata.tag(metadata.ROWS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged") / "logs"
    synthetic.write_run(str(d / "a_healthy"), n_rows=20, log_every=10)
    writer = summary.RecordWriter(str(d / "killed"), SITES)
    writer.write_first_nonfinite(
        3,
        dict(
            layer="dense",
            kind="optimizer_state",
            tensor="velocity/kernel",
            nan=0,
            posinf=1,
            neginf=0,
            propagators=[],
        ),
    )
    writer.close()
    good = [
        (
            s,
            dh.value(
                ROWS,
                tensor_util.make_tensor_proto(synthetic.finite_row(len(SITES), s)),
                dh.rows_content(SITES) if s == 0 else None,
            ),
        )
        for s in range(0, 40, 10)
    ]
    bad = (
        15,
        dh.value(ROWS, tensor_util.make_tensor_proto(synthetic.finite_row(len(SITES), 15)[:, :-1])),
    )
    dh.write_events(d / "malformed", good[:2] + [bad] + good[2:])
    dh.write_events(
        d / "unreadable",
        [
            (
                0,
                dh.value(
                    ROWS,
                    tensor_util.make_tensor_proto(np.zeros((2, 2))),
                    dh.rows_content(SITES, sites=None),
                ),
            )
        ],
    )
    with plugin_helpers.tensorboard(d) as base:
        yield base


@pytest.mark.parametrize("size", [(1400, 900), (1024, 700)])
def test_damaged_runs_in_the_tab(server, browser, size):  # noqa: F811
    context = browser.new_context(
        viewport={"width": size[0], "height": size[1]}, device_scale_factor=1
    )
    tab = Tab(context.new_page(), server)
    try:
        tab.select_run("killed")
        banner = tab.fl.locator(".nw-banner")
        assert "step 3" in banner.inner_text() and "velocity/kernel" in banner.inner_text()
        assert "killed before its first row" in tab.fl.locator(".nw-message").inner_text()
        assert not tab.fl.locator(".nw-legend").is_visible()  # nothing to colour
        assert "not in this step range" not in banner.inner_text()
        tab.page.screenshot(path=str(DOCS / ("damaged_killed_%dx%d.png" % size)))

        tab.select_run("malformed")
        dropped = tab.fl.locator(".nw-dropped").inner_text()
        assert "tag nanwatch/rows: record at step 15 dropped" in dropped
        assert tab.heat("step_range")["rows"] == 4
        assert "nw-banner-warn" in banner.get_attribute("class")  # not the all-clear green
        tab.page.screenshot(path=str(DOCS / ("damaged_malformed_%dx%d.png" % size)))

        # (by value: an option's label also names the run's state)
        tab.fl.locator("select.nw-run").select_option(
            value=json.dumps(["unreadable", None], separators=(",", ":"))
        )
        message = tab.fl.locator(".nw-message")
        message.wait_for(state="visible")
        tab.frame.wait_for_function(
            "() => document.querySelector('.nw-message').textContent.includes('site list')"
        )
        assert "the site list of the rows tag is null, not a list" in message.inner_text()
        assert not tab.fl.locator(".nw-legend").is_visible()  # not the previous run's
        tab.page.screenshot(path=str(DOCS / ("damaged_unreadable_%dx%d.png" % size)))
        assert tab.errors == [] and tab.dialogs == []
    finally:
        context.close()
