"""The diagnosis where users see it: the `/diagnosis` route (TensorBoard's own WSGI app and
data provider over real event files) and the tab's banner in headless Chromium."""

import os
import pathlib

import plugin_helpers
import pytest
from test_diagnosis import Run

from tb_nanwatch import diagnosis, early_warning, reader, summary

EARLY_RGB = (179, 71, 0)  # frontend/heatmap.js EARLY_MARK
SHOTS = pathlib.Path(os.environ.get("NANWATCH_SHOTS", "/tmp/nanwatch_shots"))


def f_like():
    """The articles' scenario F as the logs show it: inputs in +-1e10, Adam's velocity overflows."""
    run = Run(steps=12)
    run.set(0, max_abs=9.6e9, std=5.5e9)
    run.set(run.index("dense", "weight_grad", "kernel"), at=3, max_abs=1.85e19)
    return run.blow_up(3, run.index("dense", "optimizer_state", "velocity/kernel"))


def write(run, logdir):
    with summary.RecordWriter(str(logdir), run.sites, log_every=1) as writer:
        for step, row in zip(run.steps, run.rows):
            writer.write_row(int(step), row)
        if run.first is not None:
            writer.write_first_nonfinite(
                run.first["step"], {k: v for k, v in run.first.items() if k != "step"}
            )
        if run.events:
            writer.write_events(int(run.steps[-1]), run.events)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diagnosis") / "logs"
    write(f_like(), d / "f_like")
    write(Run(), d / "healthy")
    dead = Run()
    dead.set(dead.index("dense", "weight_grad", "kernel"), at=slice(5, None), zero_frac=1.0)
    write(dead, d / "vanishing")
    warned = Run()
    warned.events = [
        {
            "type": "early_warning",
            "step": 20,
            "site": 2,
            "layer": "dense_1",
            "kind": "activation",
            "tensor": "",
            "dtype": "float32",
            "norm": 2.9e19,
            "limit": 3.4e38,
            "growth_per_step": 1.59,
            "doublings_left": 63.3,
            "predicted_step": 115,
        }
    ]
    write(warned, d / "warned")
    return d


@pytest.fixture(scope="module")
def app(logdir):
    from test_plugin_backend import App

    return App(logdir)


def test_route_answers_what_the_report_says(app, logdir):
    provider, ctx, eid = reader.open_logdir(str(logdir))
    for run in ("f_like", "healthy", "vanishing", "warned"):
        got = app.json("/diagnosis", run=run)
        data = reader.read_run(provider, ctx, eid, run)
        assert got["diagnosis"] == diagnosis.diagnose(data)
        assert got["early_warning"] == early_warning.as_json(early_warning.from_run(data))
    assert [d["cause"] for d in app.json("/diagnosis", run="f_like")["diagnosis"]] == [
        "unscaled_inputs",
        "optimizer_state_overflow",
    ]
    healthy = app.json("/diagnosis", run="healthy")
    assert healthy["diagnosis"] == [] and healthy["early_warning"] is None
    # No stop mode here: no bundle, no replay (the failing step's facts, read from the run).
    assert healthy["failing_step"]["bundle"] is None and healthy["failing_step"]["replay"] is None


def test_route_errors(app):
    assert app.get("/diagnosis").status_code == 400
    r = app.get("/diagnosis", run="nope")
    assert r.status_code == 404 and b"nope" in r.get_data()


@pytest.fixture(scope="module")
def server(logdir):
    with plugin_helpers.tensorboard(logdir) as base:
        yield base


def test_banner_names_the_causes(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_frontend import CHROMIUM, CHROMIUM_ARGS, Tab

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for width, height in ((1400, 900), (1024, 700)):
            page = browser.new_context(viewport={"width": width, "height": height}).new_page()
            tab = Tab(page, server)
            tab.select_run("f_like")
            causes = tab.fl.locator(".nw-banner .nw-diagnosis .nw-cause")
            causes.first.wait_for()
            assert causes.count() == 2
            assert [causes.nth(i).get_attribute("data-cause") for i in range(2)] == [
                "unscaled_inputs",
                "optimizer_state_overflow",
            ]
            box = tab.fl.locator(".nw-banner .nw-diagnosis").inner_text()
            assert box.startswith("Why (most likely first):")
            assert (
                "largest |x| 9.6e+09 at step 0" in box and "Remedy: Standardise the inputs" in box
            )
            # Remedy code is code, not text to retype.
            assert (
                tab.fl.locator(".nw-banner .nw-cause .nw-code")
                .first.inner_text()
                .startswith("norm = keras.layers")
            )
            page.screenshot(path=str(SHOTS / ("diagnosis_%dx%d.png" % (width, height))))
            # A finite run with a warning says why to worry; a healthy run says nothing more.
            tab.select_run("vanishing")
            tab.fl.locator(".nw-banner .nw-cause[data-cause=vanishing_gradients]").wait_for()
            assert (
                tab.fl.locator(".nw-banner .nw-diagnosis-lead").inner_text()
                == "Why to worry (most likely first):"
            )
            # The writer's early-warning event: in the banner, and a triangle above its column.
            tab.select_run("warned")
            tab.fl.locator(".nw-banner .nw-early-warning").wait_for()
            assert tab.fl.locator(".nw-banner .nw-early-warning").inner_text() == (
                "Early warning at step 20: dense_1, activation was on course to pass float32's largest value "
                "by step 115 (norm \u00d71.59 a step)."
            )
            assert (
                "early warning (on course to overflow)" in tab.fl.locator(".nw-legend").inner_text()
            )
            assert "nw-banner-warn" in tab.fl.locator(".nw-banner").get_attribute(
                "class"
            )  # not the all-clear
            (event,) = [e for e in tab.heat("events") if e["type"] == "early_warning"]
            mark = tab.eval(
                """([col]) => {
                const L = window.__nanwatch.layout;
                const ctx = document.querySelector('canvas.nw-heatmap').getContext('2d');
                const px = (c) => Array.from(ctx.getImageData(Math.floor(L.gridX + (c + 0.5) * L.colW), L.gridY - 8, 1, 1).data);
                return [px(col), px(col + 6)];
            }""",
                [event["column"]],
            )
            assert tuple(mark[0][:3]) == EARLY_RGB and tuple(mark[1][:3]) != EARLY_RGB, mark
            page.screenshot(path=str(SHOTS / ("early_warning_%dx%d.png" % (width, height))))
            tab.select_run("healthy")
            page.wait_for_timeout(1000)
            assert tab.fl.locator(".nw-banner .nw-diagnosis:not([hidden])").count() == 0
            assert tab.errors == [] and tab.dialogs == []
            page.context.close()
        browser.close()
