"""The NanWatch tab in headless Chromium against a real TensorBoard.

Opens http://127.0.0.1:PORT/#nanwatch, finds the plugin's iframe and checks that the
heatmap is drawn, the banner names the first non-finite site, hovering shows every
statistic, clicking pins, dragging zooms, the flight recorder shows single steps, a
layer named `<img src=x onerror=alert(1)>` stays text, the tab follows TensorBoard's
reload button, and a mixed-precision run shows its loss-scale skips, its warning signs
and the worker.  Saves docs/screenshot.png (the README's) and
docs/screenshot_mixed_precision.png.
"""

import json
import os
import pathlib
import re

import plugin_helpers
import pytest
import synthetic

from tb_nanwatch import stats, summary

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS = "<img src=x onerror=alert(1)>"
XSS_FIRST_SITE = 10  # sites_for(("dense", XSS, "dense_2")): weight_grad of XSS's kernel
SCREENSHOT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
SCREENSHOT_MP = SCREENSHOT.with_name("screenshot_mixed_precision.png")

# The statistics table's status colours: the tab draws with those (from /info).
NAN_RGB = tuple(stats.STATUS_COLOURS["nan"])
POSINF_RGB = tuple(stats.STATUS_COLOURS["+inf"])
MIXED_RGB = tuple(stats.STATUS_COLOURS["mixed"])
SKIP_RGB = (120, 120, 120)  # the tick above a loss-scale skip's column
BIG_FIRST_STEP, BIG_FIRST_LAYER = 4502, "block_13_expand_BN"
SIZES = ((1400, 900), (1024, 700))
MODEL = "sequential"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("frontend") / "logs"
    plugin_helpers.write_blowup_run(str(d / "adam_blowup"))
    xss_sites = synthetic.sites_for(("dense", XSS, "dense_2"))
    assert xss_sites[XSS_FIRST_SITE]["layer"] == XSS
    synthetic.write_run(
        str(d / "xss"), n_rows=60, log_every=10, first=(303, XSS_FIRST_SITE, "nan"), sites=xss_sites
    )
    synthetic.write_run(str(d / "zz_live"), n_rows=20, log_every=10)
    # Two finite runs whose input and loss sit in the row named after the model: one whose
    # loss goes down ("healthy"), one stuck at 0.9 ("finite").
    model_sites = [
        dict(s, layer=MODEL) if s["kind"] in ("input", "loss") else s for s in synthetic.sites_for()
    ]
    synthetic.write_run(
        str(d / "learning_model"),
        n_rows=20,
        log_every=10,
        sites=model_sites,
        loss=lambda s: 2 / (1 + s),
    )
    synthetic.write_run(
        str(d / "stuck_model"), n_rows=20, log_every=10, sites=model_sites, loss=lambda s: 0.9
    )
    plugin_helpers.write_mixed_precision_run(str(d / "mp_blowup"))
    plugin_helpers.write_mixed_precision_run(str(d / "mp_healthy"), blowup=False)
    # MobileNetV2's 944 sites (156 layers): +Inf first in block_13_expand_BN's output at step 4502.
    big = synthetic.mobilenet_sites()
    synthetic.write_run(
        str(d / "mobilenetv2"),
        n_rows=100,
        log_every=100,
        sites=big,
        first=(
            BIG_FIRST_STEP,
            big.index(next(s for s in big if s["layer"] == BIG_FIRST_LAYER)),
            "posinf",
        ),
    )
    # The first non-finite value is a gradient w.r.t. an output, computed in sqrt's backward pass.
    sites = synthetic.sites_for()
    with summary.RecordWriter(str(d / "sqrt_grad"), sites) as writer:
        for step in (9, 19, 29):
            writer.write_row(step, synthetic.finite_row(len(sites), step, steps=10))
        writer.write_first_nonfinite(
            25,
            dict(
                layer="dense_2",
                kind="activation_grad",
                tensor="",
                site=5,
                nan=16,
                posinf=0,
                neginf=0,
                propagators=[],
                backward_of=["sqrt"],
            ),
        )
    return d


@pytest.fixture(scope="module")
def server(logdir):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is required at %s (make chromium)" % CHROMIUM)
    with plugin_helpers.tensorboard(logdir, "--reload_interval=1") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """The TensorBoard page and the NanWatch iframe inside it."""

    def __init__(self, page, base):
        self.page = page
        self.dialogs = []
        self.errors = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.set_default_timeout(20000)
        page.goto(base + "/#nanwatch")
        self.fl = page.frame_locator("iframe")
        self.fl.locator("canvas.nw-heatmap[data-columns]").wait_for()
        self.frame = next(f for f in page.frames if "plugin_entry.html?name=nanwatch" in f.url)

    def eval(self, js, arg=None):
        return self.frame.evaluate(js, arg)

    def wait(self, js, arg=None):
        self.frame.wait_for_function(js, arg=arg)

    def canvas_box(self):
        return self.fl.locator("canvas.nw-heatmap").bounding_box()

    def cell_xy(self, row, col):
        """Page coordinates of the centre of heatmap cell (row, col); `row` counts the rows
        shown (layers, or sites of an opened layer), scrolled into sight first."""
        x, y = self.eval(
            """([r, c]) => {const app = window.__nanwatch; app.scrollToShownRow(r); app.drawGrid();
            const L = app.layout; return [L.gridX + (c + 0.5) * L.colW, L.gridY + (r - L.offset + 0.5) * L.rowH];}""",
            [row, col],
        )
        box = self.canvas_box()
        return box["x"] + x, box["y"] + y

    def first_cell_xy(self):
        """The first non-finite cell, after the banner's button opened its layer."""
        self.fl.locator(".nw-banner button.nw-jump").click()
        self.wait(
            "() => { const a = window.__nanwatch; return a.shown[a.firstShownRow()] === a.heat.first_nonfinite_cell.row; }"
        )
        c = self.eval("() => window.__nanwatch.heat.first_nonfinite_cell")
        return self.cell_xy(self.eval("() => window.__nanwatch.firstShownRow()"), c["column"])

    def colours(self):
        """Distinct canvas colours (RGB) and how often each appears."""
        return {
            tuple(k): v
            for k, v in self.eval("""() => {
            const c = document.querySelector('canvas.nw-heatmap');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const counts = new Map();
            for (let i = 0; i < d.length; i += 4) {
              if (d[i + 3] < 255) continue;
              const k = d[i] + ',' + d[i + 1] + ',' + d[i + 2];
              counts.set(k, (counts.get(k) || 0) + 1);
            }
            return Array.from(counts, ([k, v]) => [k.split(',').map(Number), v]);
        }""")
        }

    def select_run(self, run):
        # Options read "run \u2014 its state"; their values are [run, group] in JSON.
        self.fl.locator("select.nw-run").select_option(
            value=json.dumps([run, None], separators=(",", ":"))
        )
        self.wait("(run) => window.__nanwatch.heat && window.__nanwatch.heat.run === run", run)

    def heat(self, field):
        return self.eval("(f) => window.__nanwatch.heat[f]", field)


@pytest.fixture
def tab(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    t = Tab(page, server)
    yield t
    assert t.errors == [], t.errors
    assert t.dialogs == [], t.dialogs
    context.close()


def test_heatmap_drawn_with_banner(tab):
    assert tab.heat("run") == "adam_blowup"
    banner = tab.fl.locator(".nw-banner .nw-headline").inner_text()
    assert (
        banner
        == "First +Inf at step %d: dense_2, optimizer state velocity/kernel"
        % plugin_helpers.BLOWUP_STEP
    )
    assert "dense_2/optimizer_state/velocity/bias" in tab.fl.locator(".nw-banner").inner_text()
    colours = tab.colours()
    # The blue ramp, white, grey text, the outline... and the non-finite colours.
    assert len([c for c, n in colours.items() if n >= 20]) > 12, len(colours)
    assert colours.get(NAN_RGB, 0) > 1000 and colours.get(MIXED_RGB, 0) > 100
    assert tab.heat("n_columns") == plugin_helpers.BLOWUP_COLUMNS
    legend = tab.fl.locator(".nw-legend").inner_text()
    for word in ("max_abs", "log scale", "first non-finite value", "exactly 0"):
        assert word in legend, word
    for name in stats.STATUS_NAMES[1:]:  # every status's words, from the table
        assert stats.STATUS_WORDS[name] in legend, name


def test_stat_choices_come_from_the_backend_table(tab):
    options = tab.fl.locator("select.nw-stat option").all_inner_texts()
    assert options == list(stats.STAT_NAMES)
    kinds = tab.fl.locator("select.nw-kind option").all_inner_texts()
    assert kinds == ["all kinds"] + [stats.kind_words(k) for k in stats.KINDS]
    tab.fl.locator("select.nw-stat").select_option("nan")
    tab.wait("() => window.__nanwatch.heat.stat === 'nan'")
    assert "nan (count, log scale)" in tab.fl.locator(".nw-legend").inner_text()
    tab.fl.locator("select.nw-kind").select_option("weight")
    tab.wait("() => window.__nanwatch.heat.kind === 'weight'")
    assert tab.heat("n_sites") == 2 * len(plugin_helpers.BLOWUP_LAYERS)


def test_hover_shows_every_statistic_and_click_pins(tab):
    x, y = tab.first_cell_xy()
    tab.page.mouse.move(x, y)
    tip = tab.fl.locator(".nw-tooltip")
    tip.wait_for(state="visible")
    tab.wait(
        "(n) => document.querySelectorAll('.nw-tooltip .nw-tip-stats tr').length === n",
        len(stats.STATS),
    )
    text = tip.inner_text()
    assert "dense_2/optimizer_state/velocity/kernel" in text
    for name in stats.STAT_NAMES:
        assert name in text, name
    assert "flight recorder" in text and str(plugin_helpers.BLOWUP_STEP) in text
    # Pin, move away: it stays; Escape unpins.
    tab.page.mouse.down()
    tab.page.mouse.up()
    assert "nw-pinned" in tip.get_attribute("class")
    ox, oy = tab.cell_xy(0, 0)
    tab.page.mouse.move(ox, oy)
    tab.page.wait_for_timeout(300)
    assert tip.is_visible() and "velocity/kernel" in tip.inner_text()
    tab.page.keyboard.press("Escape")
    tip.wait_for(state="hidden")


def test_drag_zooms_and_zoom_out_returns(tab):
    x0, y = tab.cell_xy(5, 100)
    x1, _ = tab.cell_xy(5, 149)
    tab.page.mouse.move(x0, y)
    tab.page.mouse.down()
    tab.page.mouse.move((x0 + x1) / 2, y, steps=4)
    tab.page.mouse.move(x1, y, steps=4)
    tab.page.mouse.up()
    tab.wait("() => window.__nanwatch.heat.first_steps[0] === 1000")
    assert tab.heat("last_steps")[-1] == 1499 and tab.heat("n_columns") == 50
    assert "steps 1000\u20131499" in tab.fl.locator(".nw-zoom-text").inner_text()
    tab.fl.locator("button.nw-zoom-out").click()
    tab.wait(
        "() => window.__nanwatch.heat.first_steps[0] === 0 && window.__nanwatch.heat.n_columns === %d"
        % plugin_helpers.BLOWUP_COLUMNS
    )


def test_flight_recorder_at_step_resolution(tab):
    tab.fl.locator(".nw-banner button.nw-flight").click()
    tab.wait("() => window.__nanwatch.heat.source === 'flight'")
    steps = list(
        range(
            plugin_helpers.BLOWUP_STEP - plugin_helpers.BLOWUP_FLIGHT + 1,
            plugin_helpers.BLOWUP_STEP + 1,
        )
    )
    assert tab.heat("first_steps") == steps == tab.heat("last_steps")
    # At step resolution the first cell is +Inf itself (red), not a mixed bin.
    assert tab.colours().get(POSINF_RGB, 0) > 100
    x, y = tab.first_cell_xy()
    tab.page.mouse.move(x, y)
    tab.wait(
        "() => /\\+Inf/.test(document.querySelector('.nw-tooltip .nw-tip-status').textContent)"
    )


def test_layer_names_are_text_never_html(tab):
    tab.select_run("xss")
    banner = tab.fl.locator(".nw-banner .nw-headline")
    assert banner.inner_text() == "First NaN at step 303: %s, weight gradient kernel" % XSS
    assert "&lt;img" in tab.eval("() => document.querySelector('.nw-banner').innerHTML")
    assert tab.fl.locator("img").count() == 0
    assert tab.page.locator("img[src=x]").count() == 0
    x, y = tab.first_cell_xy()
    tab.page.mouse.move(x, y)
    tab.fl.locator(".nw-tooltip").wait_for(state="visible")
    assert tab.fl.locator(".nw-tooltip .nw-tip-label").inner_text() == "%s/weight_grad/kernel" % XSS
    assert tab.fl.locator("img").count() == 0
    # The run selector and the propagated-to list are text too.
    assert XSS in tab.fl.locator(".nw-banner").inner_text()
    tab.page.wait_for_timeout(300)  # an onerror handler would have fired by now


def test_follows_tensorboard_reload(tab, logdir):
    tab.select_run("zz_live")
    assert (
        tab.heat("n_columns") == 20 and "No NaN or Inf" in tab.fl.locator(".nw-banner").inner_text()
    )
    sites = synthetic.sites_for()
    with summary.RecordWriter(str(logdir / "zz_live"), sites) as writer:
        for i in range(20, 30):
            step = (i + 1) * 10 - 1
            row = synthetic.finite_row(len(sites), step, steps=10)
            if i == 27:
                row[6, stats.STAT_INDEX["posinf"]] = 4
                row[6, stats.STAT_INDEX["first_nonfinite_step"]] = 275
            writer.write_row(step, row)
    # TensorBoard's own reload button; the tab listens for its DataReloaded message.  20 s
    # stays under the tab's own 30 s poll, so this fails if the reload hook is gone.
    reload_button = tab.page.locator("button.reload-button")
    for _ in range(20):
        reload_button.click()
        tab.page.wait_for_timeout(1000)
        if tab.heat("n_columns") == 30:
            break
    assert tab.heat("n_columns") == 30
    assert re.match(
        r"First \+Inf at step 275: ", tab.fl.locator(".nw-banner .nw-headline").inner_text()
    )


def test_mixed_precision_skips_warning_signs_and_worker(tab):
    tab.select_run("mp_blowup")
    headline = tab.fl.locator(".nw-banner .nw-headline").inner_text()
    assert headline == "First +Inf at step %d: dense_3, activation on worker_1, replica 3" % (
        plugin_helpers.MP_BLOWUP_STEP
    )
    # Warning signs arrive on their own, under the headline.
    tab.fl.locator(".nw-banner .nw-precursor").first.wait_for()
    signs = tab.fl.locator(".nw-banner .nw-precursors").inner_text()
    assert signs.startswith("Warning signs before it:")
    assert (
        "step 0: 100% of dense/optimizer_state/velocity/kernel below float16's smallest normal value"
        " (underflow)"
    ) in signs
    assert "dense_3/activation within 1.0 doublings of float16's largest finite value" in signs
    banner = tab.fl.locator(".nw-banner").inner_text()
    assert "29 loss-scale skips (by design" in banner and "not the blow-up" in banner
    assert "loss scale collapsed to 0.125 at step 2429" in banner
    legend = tab.fl.locator(".nw-legend").inner_text()
    assert "loss-scale skip (by design)" in legend and "loss scale collapsed" in legend
    # A grey tick above the column of the skip at step 2005, none above its neighbour.
    events = tab.heat("events")
    (skip,) = [e for e in events if e["step"] == 2005]
    tick = tab.eval(
        """([col]) => {
        const L = window.__nanwatch.layout;
        const ctx = document.querySelector('canvas.nw-heatmap').getContext('2d');
        const px = (c) => Array.from(ctx.getImageData(Math.floor(L.gridX + (c + 0.5) * L.colW), L.gridY - 4, 1, 1).data);
        return [px(col), px(col - 3)];
    }""",
        [skip["column"]],
    )
    assert tuple(tick[0][:3]) == SKIP_RGB and tuple(tick[1][:3]) != SKIP_RGB, tick
    # Its tooltip says what that column's non-finite gradients are.
    # (the row of the layer of the first weight gradient: a layer shows the worst of its sites)
    grad_row = tab.eval("""() => { const a = window.__nanwatch, h = a.heat;
        const layer = h.sites.find((s) => s.kind === 'weight_grad').layer;
        return a.shown.findIndex((r) => h.rows[r].level === 'layer' && h.rows[r].name === layer); }""")
    assert grad_row >= 0
    x, y = tab.cell_xy(grad_row, skip["column"])
    # Hover until the tooltip shows (a loaded machine can drop a hover that lands mid-layout).
    for attempt in range(3):
        tab.page.mouse.move(5, 5)
        tab.page.mouse.move(x, y, steps=2)
        try:
            tab.fl.locator(".nw-tooltip .nw-tip-event").wait_for(timeout=10000)
            break
        except sync_api.TimeoutError:
            if attempt == 2:
                raise
    note = tab.fl.locator(".nw-tooltip .nw-tip-event").inner_text()
    assert note.startswith("Loss-scale skip at step 2005 (by design)") and "not the blow-up" in note
    assert tab.fl.locator(".nw-tooltip .nw-tip-status").inner_text() == "+Inf"
    tab.page.mouse.move(5, 5)

    # No first non-finite value, but skips: the banner says so, and shows the warning signs.
    tab.select_run("mp_healthy")
    assert tab.fl.locator(".nw-banner .nw-headline").inner_text() == (
        "No NaN or Inf in the model: 6 loss-scale skips (by design; loss scale now 1024)"
    )
    tab.fl.locator(".nw-banner .nw-precursor").first.wait_for()
    assert "nw-banner-warn" in tab.fl.locator(".nw-banner").get_attribute("class")
    assert tab.fl.locator(".nw-banner .nw-precursor-lead").inner_text() == "Warning signs:"
    assert "loss-scale skip (by design)" in tab.fl.locator(".nw-legend").inner_text()

    tab.select_run("sqrt_grad")
    assert tab.fl.locator(".nw-banner .nw-headline").inner_text() == (
        "First NaN at step 25: dense_2, activation gradient"
    )
    assert (
        tab.fl.locator(".nw-banner .nw-first-detail").inner_text()
        == "Computed in the backward pass of sqrt."
    )
    assert "loss-scale skip" not in tab.fl.locator(".nw-legend").inner_text()


def test_screenshot_mixed_precision(tab):
    """A mixed-precision run: skips marked above the heatmap, warning signs, the worker."""
    tab.select_run("mp_blowup")
    tab.fl.locator(".nw-banner .nw-precursor").first.wait_for()
    tab.page.mouse.move(5, 5)
    tab.page.wait_for_timeout(300)
    tab.page.screenshot(path=str(SCREENSHOT_MP))
    assert SCREENSHOT_MP.stat().st_size > 50000


def test_screenshot(tab):
    """The README's screenshot: the default view, nothing covering the heatmap."""
    tab.page.mouse.move(5, 5)
    tab.page.wait_for_timeout(300)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 50000


@pytest.mark.parametrize("width,height", SIZES)
def test_944_sites_fit_one_screen_with_the_first_layer_in_sight(server, browser, width, height):
    """A MobileNetV2-sized run: one row per layer or block, no canvas taller than the
    window, the first non-finite row in sight without scrolling, then opened by the
    banner's button down to its site."""
    context = browser.new_context(
        viewport={"width": width, "height": height}, device_scale_factor=1
    )
    tab = Tab(context.new_page(), server)
    try:
        tab.select_run("mobilenetv2")
        view = tab.eval("""() => { const a = window.__nanwatch, L = a.layout;
            return {shown: a.shown.length, drawn: L.nShown, offset: L.offset, first: a.firstShownRow(),
                    canvas: a.canvas.getBoundingClientRect().bottom, inner: innerHeight,
                    label: a.heat.rows[a.shown[a.firstShownRow()]].label}; }""")
        assert tab.heat("n_sites") == 944
        # One toolbar line, or two at 1024 px where the run's whole label ("mobilenetv2 \u2014
        # +Inf at step 4502 in block_13_expand_BN") takes the room of the controls after it.
        lines = 1 if width >= 1400 else 2
        assert tab.eval("() => document.querySelector('.nw-toolbar').offsetHeight") < 8 + 32 * lines
        assert view["canvas"] <= height, view  # the iframe's own window is smaller still
        assert view["shown"] <= 40, view  # layers and blocks, not 944 sites
        assert view["offset"] <= view["first"] < view["offset"] + view["drawn"], view
        assert view["label"] == "block_13", view  # the block holding the producer, closed
        tab.page.mouse.move(5, 5)
        tab.page.wait_for_timeout(200)
        tab.page.screenshot(
            path=str(SCREENSHOT.with_name("screenshot_944_sites_%dx%d.png" % (width, height)))
        )
        # The banner's button opens block_13 and its layer, and scrolls to the producer's row.
        tab.fl.locator(".nw-banner button.nw-jump").click()
        tab.wait(
            "() => { const a = window.__nanwatch; return a.shown[a.firstShownRow()] === a.heat.first_nonfinite_cell.row; }"
        )
        row = tab.eval(
            "() => { const a = window.__nanwatch, L = a.layout, k = a.firstShownRow();"
            " return {k, offset: L.offset, drawn: L.nShown, label: a.heat.rows[a.shown[k]].label}; }"
        )
        assert (
            row["label"] == "activation"
            and row["offset"] <= row["k"] < row["offset"] + row["drawn"]
        ), row
        assert tab.eval("() => window.__nanwatch.canvas.height") <= height
        assert tab.errors == []
    finally:
        context.close()


def test_the_frontend_defines_no_stat_kind_or_status_of_its_own():
    """Every statistic, kind and status name, and every colour ramp, comes from /info: a
    string literal in the JS that names one (or a ramp of its own) fails here."""
    names = set(stats.STAT_NAMES) | set(stats.KINDS) | set(stats.STATUS_NAMES)
    literal = re.compile(r"""(["'`])((?:\\.|(?!\1).)*)\1""")
    found = []
    for path in sorted(
        pathlib.Path(__file__).resolve().parent.parent.joinpath("frontend").glob("*.js")
    ):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0] if not line.strip().startswith("//") else ""
            for m in literal.finditer(code):
                if m.group(2) in names or re.fullmatch(r"\d+, \d+, \d+", m.group(2) or ""):
                    found.append("%s:%d: %s" % (path.name, number, m.group(0)))
            # object keys too: {nan: ...} or {"+inf": ...}
            for m in re.finditer(r"[{,]\s*([A-Za-z_+-]+)\s*:", code):
                if m.group(1) in names:
                    found.append("%s:%d: key %s" % (path.name, number, m.group(1)))
    assert found == []


def test_the_view_lives_in_the_url_and_a_reload_opens_it_again(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    try:
        page.goto(server + "/#nanwatch&nw_run=xss&nw_stat=nan&nw_kind=weight_grad")
        frame_locator = page.frame_locator("iframe")
        frame_locator.locator("canvas.nw-heatmap[data-columns]").wait_for()
        frame = next(f for f in page.frames if "plugin_entry.html?name=nanwatch" in f.url)
        frame.wait_for_function(
            "() => window.__nanwatch.heat && window.__nanwatch.heat.run === 'xss'"
        )
        assert frame.evaluate(
            "() => [window.__nanwatch.heat.stat, window.__nanwatch.heat.kind]"
        ) == ["nan", "weight_grad"]
        frame_locator.locator("select.nw-stat").select_option("norm")
        frame.wait_for_function("() => window.__nanwatch.heat.stat === 'norm'")
        page.wait_for_function("() => location.hash.includes('nw_stat=norm')")
        assert page.evaluate("() => location.hash").startswith(
            "#nanwatch&"
        )  # TensorBoard's own key kept
        page.reload()
        page.frame_locator("iframe").locator("canvas.nw-heatmap[data-columns]").wait_for()
        frame = next(f for f in page.frames if "plugin_entry.html?name=nanwatch" in f.url)
        frame.wait_for_function(
            "() => window.__nanwatch.heat && window.__nanwatch.heat.run === 'xss'"
        )
        assert frame.evaluate(
            "() => [window.__nanwatch.heat.stat, window.__nanwatch.heat.kind]"
        ) == ["norm", "weight_grad"]
    finally:
        context.close()


def test_dark_mode_follows_tensorboard(tab):
    """TensorBoard's theme button toggles `dark-mode` on its page's body; the tab follows."""
    light = tab.eval("() => getComputedStyle(document.body).backgroundColor")
    tab.page.evaluate("() => document.body.classList.add('dark-mode')")
    tab.wait("() => document.body.classList.contains('nw-dark')")
    dark = tab.eval("() => getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(255, 255, 255)" and dark != light
    # The canvas's own text takes the theme's colour too.
    assert (
        tab.eval(
            "() => window.__nanwatch && getComputedStyle(document.body).getPropertyValue('--nw-text').trim()"
        )
        == "#e0e0e0"
    )
    tab.page.mouse.move(5, 5)
    tab.page.wait_for_timeout(300)
    tab.page.screenshot(path=str(SCREENSHOT.with_name("screenshot_dark.png")))
    tab.page.evaluate("() => document.body.classList.remove('dark-mode')")
    tab.wait("() => !document.body.classList.contains('nw-dark')")


def test_empty_logdir_is_a_clean_state(tmp_path, browser):
    logdir = tmp_path / "empty"
    logdir.mkdir()
    with plugin_helpers.tensorboard(logdir, "--reload_interval=1") as base:
        context = browser.new_context(
            viewport={"width": 1024, "height": 700}, device_scale_factor=1
        )
        page = context.new_page()
        try:
            # The plugin's own page (TensorBoard's iframe) opened alone: TensorBoard's frontend
            # only loads the iframe of an inactive plugin at its next 30 s reload.
            page.goto(base + "/data/plugin_entry.html?name=nanwatch")
            fl = page
            fl.locator(".nw-message:not([hidden])").wait_for()
            assert "No NanWatch data yet" in fl.locator(".nw-message").inner_text()
            disabled = fl.locator(".nw-toolbar select:disabled, .nw-zoom button:disabled").count()
            assert disabled == fl.locator(".nw-toolbar select, .nw-zoom button").count() >= 6
            assert fl.locator(".nw-subbar").is_hidden() and fl.locator(".nw-stack").is_hidden()
        finally:
            context.close()


def test_runs_overview_lists_every_runs_state(tab):
    options = tab.fl.locator("select.nw-run option").all_inner_texts()
    assert "adam_blowup \u2014 +Inf at step %d in dense_2" % plugin_helpers.BLOWUP_STEP in options
    assert any(
        re.match("mp_healthy \u2014 (healthy|finite) but 6 loss-scale skips", o) for o in options
    ), options
    # Finite is "healthy" only when the loss went down; a loss stuck at 0.9 is "finite".
    assert "learning_model \u2014 healthy" in options
    assert "stuck_model \u2014 finite" in options
    summary = tab.fl.locator(".nw-overview-summary")
    assert re.match(
        r"\d+ runs: \d+ runs with a non-finite value, 1 with loss-scale skips only, 1 healthy, "
        r"\d+ finite without progress",
        summary.inner_text(),
    ), summary.inner_text()
    assert "did not go down" in summary.get_attribute("title")
    stuck = tab.fl.locator(".nw-overview-list tr", has_text="stuck_model")
    assert "loss 0.9 at step 9, 0.9 at step 199" in stuck.get_attribute("title")
    summary.click()
    tab.fl.locator(".nw-overview-list tr", has_text="mp_healthy").click()
    tab.wait("() => window.__nanwatch.heat.run === 'mp_healthy'")


@pytest.mark.parametrize("width,height", SIZES)
def test_run_menu_labels_are_never_cut(server, browser, width, height):
    """The run menu is as wide as the chosen run's label (its state included), at 1400x900
    and 1024x700; the toolbar stays on screen."""
    context = browser.new_context(
        viewport={"width": width, "height": height}, device_scale_factor=1
    )
    page = context.new_page()
    try:
        tab = Tab(page, server)
        options = tab.fl.locator("select.nw-run option").all_inner_texts()
        longest = max(options, key=len)
        value = tab.eval(
            "(t) => [...document.querySelectorAll('select.nw-run option')].find((o) => o.text === t).value",
            longest,
        )
        run = json.loads(value)[0]
        tab.fl.locator("select.nw-run").select_option(value)
        tab.wait("(r) => window.__nanwatch.heat && window.__nanwatch.heat.run === r", run)
        fit = tab.eval(
            """() => {
              const s = document.querySelector('select.nw-run');
              const st = getComputedStyle(s);
              const ctx = document.createElement('canvas').getContext('2d');
              ctx.font = `${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
              const r = s.getBoundingClientRect();
              return {text: s.options[s.selectedIndex].text, need: ctx.measureText(s.options[s.selectedIndex].text).width,
                inner: r.width - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) - 16,
                right: r.right, page: document.documentElement.clientWidth, title: s.title};
            }"""
        )
        assert fit["text"] == longest
        assert fit["need"] <= fit["inner"], fit  # the text and the arrow fit inside the box
        assert fit["right"] <= fit["page"], fit
        assert fit["title"].startswith(longest)
        if width >= 1400:  # and with room to spare, the toolbar stays one line
            assert tab.eval("() => document.querySelector('.nw-toolbar').offsetHeight") < 40
        # Every other label fits as well once chosen (the same sizing, applied in place).
        widths = tab.eval(
            """async () => {
              const {fitSelectToChoice} = await import('./controls.js');
              const s = document.querySelector('select.nw-run');
              const keep = s.selectedIndex, st = getComputedStyle(s), out = [];
              const ctx = document.createElement('canvas').getContext('2d');
              ctx.font = `${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
              for (let i = 0; i < s.options.length; i++) {
                s.selectedIndex = i; fitSelectToChoice(s);
                out.push([s.options[i].text, ctx.measureText(s.options[i].text).width,
                  s.getBoundingClientRect().width - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight) - 16]);
              }
              s.selectedIndex = keep; fitSelectToChoice(s);
              return out;
            }"""
        )
        assert [w for w in widths if w[1] > w[2]] == []
        if os.environ.get("NANWATCH_SHOTS"):  # to look at it: a directory for the screenshot
            page.screenshot(
                path=os.path.join(os.environ["NANWATCH_SHOTS"], "run_menu_%d.png" % width)
            )
    finally:
        context.close()


def test_the_row_named_after_the_model_is_explained(tab):
    """A line under the legend (and the tooltip of that row's name) says that the row named
    after the model is not a layer: it holds the model's input and its loss."""
    words = "The row %s is the model itself, not a layer: its input (%s) and its loss (%s)." % (
        MODEL,
        stats.KIND_MEANINGS["input"],
        stats.KIND_MEANINGS["loss"],
    )
    tab.select_run("learning_model")
    note = tab.fl.locator(".nw-model-note")
    note.wait_for()
    assert note.inner_text() == words
    row = tab.eval(
        "(m) => window.__nanwatch.shown.findIndex((r) => window.__nanwatch.heat.rows[r].name === m)",
        MODEL,
    )
    assert row >= 0
    x, y = tab.eval(
        """(r) => {const L = window.__nanwatch.layout; return [L.gridX - 20, L.gridY + (r - L.offset + 0.5) * L.rowH];}""",
        row,
    )
    box = tab.canvas_box()
    tab.page.mouse.move(box["x"] + x, box["y"] + y)
    tab.wait("(w) => document.querySelector('canvas.nw-heatmap').title === w", words)
    # Another row's name has no such tooltip; a run whose loss has no model name, no note.
    tab.page.mouse.move(
        box["x"] + x, box["y"] + y + tab.eval("() => window.__nanwatch.layout.rowH")
    )
    tab.wait("() => document.querySelector('canvas.nw-heatmap').title === ''")
    tab.select_run("adam_blowup")
    tab.wait("() => document.querySelector('.nw-model-note').hidden")
