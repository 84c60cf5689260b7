// NanWatch tab: entry point loaded by TensorBoard's plugin iframe
// (`import("./index.js").then(m => m.render())`).  Wires data access (data.js), the
// canvas heatmap (heatmap.js) and the controls (controls.js).

import {api} from "./data.js";
import {drawHeatmap, drawOverlay, drawLegend, makeScale, setStatusColours, formatNumber, MAX_LABEL_W, ROW_H,
  heightFor, setTheme, columnWords} from "./heatmap.js";
import {table, setTable, kindWords, countStats, runStateWords, runStateMeaning} from "./table.js";
import {readView, writeView, watchDarkMode} from "./location.js";
import {visibleRows, hasChildren, initialOpen, rowKey, shownRowFor} from "./tree.js";
import {buildToolbar, attachCanvasMouse, Tooltip} from "./controls.js";
import {renderDiagnosis} from "./diagnosis.js";

const POLL_MS = 30000;

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}


// "dense, optimizer state velocity/kernel"
export function siteWords(s) {
  const what = [kindWords(s.kind), s.tensor].filter((x) => x).join(" ");
  return s.layer ? `${s.layer}, ${what}` : what;
}

function siteLabel(s) {
  return [s.layer, s.kind, s.tensor].filter((x) => x).join("/");
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// "a", "a and b", "a, b and c"
function listWords(items) {
  const xs = items.map(String);
  return xs.length <= 1 ? xs.join("") : `${xs.slice(0, -1).join(", ")} and ${xs[xs.length - 1]}`;
}

// " on worker_1, replica 3" under tf.distribute, "" otherwise.
function whereWords(first) {
  const parts = [];
  if (first.worker) parts.push(String(first.worker));
  const replicas = Array.isArray(first.replicas) ? first.replicas : [];
  if (replicas.length > 1) parts.push(`replicas ${listWords(replicas)}`);
  else if (first.replica !== undefined && first.replica !== null) parts.push(`replica ${first.replica}`);
  return parts.length ? ` on ${parts.join(", ")}` : "";
}

// A run's state in a few words, from its /overview line: "+Inf at step 3 in dense",
// "finite but 6 loss-scale skips", "healthy" (finite and the loss went down), "finite"
// (state no_progress: no NaN, but no sign of training either).  The words are stats.py's.
export function stateWords(line) {
  if (!line) return "";
  if (line.state === "nonfinite") {
    const kinds = countStats().filter((c) => Number(line[c.name]) > 0).map((c) => c.words);
    return `${kinds.length ? kinds.join(" and ") : "non-finite"} at step ${line.step} in ${line.layer || kindWords(line.kind)}`;
  }
  if (line.state === "skips") {
    const progressed = line.loss_progress && line.loss_progress.progress;
    return `${runStateWords(progressed ? "healthy" : "no_progress")} but ${plural(line.loss_scale_skips, "loss-scale skip")}`;
  }
  return runStateWords(line.state);
}

// The state's meaning and the loss figures behind it, for a tooltip.
export function stateTitle(line) {
  if (!line) return "";
  const parts = [runStateMeaning(line.state)];
  const p = line.loss_progress;
  if (p) parts.push(`loss ${formatNumber(p.first)} at step ${p.first_step}, ${formatNumber(p.last)} at step ${p.last_step}`);
  return parts.filter(Boolean).join("; ");
}

// The model's name: the layer the writer files the loss under (Keras: the model's name,
// e.g. "sequential"), or "" when no loss is watched.
function modelName(heat) {
  const loss = ((heat && heat.sites) || []).find((s) => s.kind === table.info.model_row_kind);
  return loss && loss.layer ? loss.layer : "";
}

// "The row sequential is the model itself, not a layer: its input (the batch fed to the
// model) and its loss (the training loss)."  Kinds and meanings from the table; "" when the
// heatmap has no such row.
export function modelRowWords(heat) {
  const model = modelName(heat);
  if (!model) return "";
  const kinds = [...new Set(heat.sites.filter((s) => s.layer === model).map((s) => s.kind))];
  const meanings = kinds.map((k) => {
    const entry = (table.info.kinds || []).find((x) => x.name === k);
    return `its ${kindWords(k)}${entry ? ` (${entry.meaning})` : ""}`;
  });
  return `The row ${model} is the model itself, not a layer: ${listWords(meanings)}.`;
}

// "First +Inf at step 3: dense, optimizer state velocity/kernel[ on worker_1, replica 3]"
export function headline(first) {
  const kinds = countStats().filter((c) => Number(first[c.name]) > 0).map((c) => c.words);
  const what = kinds.length ? kinds.join(" and ") : "non-finite value";
  return `First ${what} at step ${first.step}: ${siteWords(first)}${whereWords(first)}`;
}

function eventCount(heat, type) {
  return (heat.event_counts || []).find((e) => e.type === type) || null;
}

// "9 loss-scale skips (by design; loss scale now 64)", or null without skips.
function skipWords(heat) {
  const c = eventCount(heat, "loss_scale_skip");
  if (!c || !c.count) return null;
  const scale = c.last ? c.last.loss_scale : undefined;
  const now = typeof scale === "number" ? `; loss scale now ${formatNumber(scale)}` : "";
  return `${plural(c.count, "loss-scale skip")} (by design${now})`;
}

function collapseWords(e) {
  const scale = typeof e.loss_scale === "number" ? ` to ${formatNumber(e.loss_scale)}` : "";
  return `The loss scale collapsed${scale} at step ${e.step}: gradients are scaled down to almost nothing` +
    " and training may have stalled silently.";
}

// What the tooltip says about the events of one heatmap column.
function columnNotes(events) {
  const notes = [];
  const skips = events.filter((e) => e.type === "loss_scale_skip");
  if (skips.length) {
    const n = skips.reduce((a, e) => a + (e.merged || 1), 0);
    const steps = skips.map((e) => e.step);
    const at = n === 1 ? `Loss-scale skip at step ${steps[0]}` : `${n} loss-scale skips at steps ${
      steps.length > 6 ? steps.slice(0, 6).join(", ") + ", \u2026" : listWords(steps)}`;
    const scale = skips[skips.length - 1].loss_scale;
    const lowered = typeof scale === "number" ? ` and lowered the loss scale to ${formatNumber(scale)}` : "";
    notes.push(`${at} (by design): the scaled gradients overflowed, so the optimizer skipped ` +
      `${n === 1 ? "this update" : "those updates"}${lowered}. Inf/NaN gradients here are not the blow-up.`);
  }
  for (const e of events) {
    if (e.type === "loss_scale_collapse") notes.push(collapseWords(e));
  }
  return notes;
}

class App {
  constructor(body) {
    this.root = el("div", "nw-root");
    body.appendChild(this.root);
    this.state = {key: null, kind: "all", stat: null, source: "rows", colour: "shared", range: null, zoom: []};
    this.info = null;
    this.runs = [];
    this.heat = null;
    this.first = null;
    this.signs = null;   // {key, list}: /precursors of the run `key`
    this.eventsByColumn = new Map();
    this.layout = null;
    this.labelW = MAX_LABEL_W;
    this.cellCache = new Map();
    this.token = 0;
    this.lastRefresh = 0;
    this.hover = null;
    this.band = null;
    this.open = new Set();   // keys (tree.rowKey) of the opened rows of this run
    this.openFor = null;     // the run `open` belongs to
    this.shown = [];         // heat rows shown, in display order

    this.toolbar = buildToolbar(this.root, {
      onRun: (key) => this.update({key, range: null, zoom: [], source: "rows"}),
      onKind: (kind) => this.update({kind}),
      onStat: (stat) => this.update({stat}),
      onSource: (source) => this.update({source, range: null, zoom: []}),
      onColour: (colour) => {
        this.state.colour = colour;
        if (this.heat) this.draw();
      },
      onZoomOut: () => {
        const zoom = this.state.zoom.slice();
        const range = zoom.pop() || null;
        this.update({zoom, range});
      },
      onZoomReset: () => this.update({zoom: [], range: null}),
      onReload: () => this.refresh(),
    });
    this.overview = el("details", "nw-overview");
    this.overview.hidden = true;
    this.root.appendChild(this.overview);
    this.banner = el("div", "nw-banner");
    this.banner.hidden = true;
    this.root.appendChild(this.banner);
    this.legend = el("div", "nw-legend");
    this.root.appendChild(this.legend);
    // Says what the row named after the model holds (it is not a layer).
    this.modelNote = el("div", "nw-model-note");
    this.modelNote.hidden = true;
    this.root.appendChild(this.modelNote);
    this.message = el("div", "nw-message");
    this.message.hidden = true;
    this.root.appendChild(this.message);
    // The rows scroll under a fixed step axis: the canvas is only as tall as the window
    // allows (sticky at the top of the scroller); a spacer gives the scrollbar its length.
    this.stack = el("div", "nw-stack");
    this.sticky = el("div", "nw-sticky");
    this.canvas = el("canvas", "nw-heatmap");
    this.overlay = el("canvas", "nw-overlay");
    this.sticky.appendChild(this.canvas);
    this.sticky.appendChild(this.overlay);
    this.stack.appendChild(this.sticky);
    this.spacer = el("div", "nw-spacer");
    this.stack.appendChild(this.spacer);
    this.root.appendChild(this.stack);
    this.stack.addEventListener("scroll", () => {
      if (this.scrollFrame) return;
      this.scrollFrame = requestAnimationFrame(() => {
        this.scrollFrame = null;
        if (this.heat && this.layout) this.drawGrid();
      });
    });
    this.hint = el("div", "nw-hint", "Click a name to open its layers or sites; hover a cell for its statistics, click to pin it, drag across steps to zoom in.");
    this.root.appendChild(this.hint);
    this.tooltip = new Tooltip(document.body, () => this.setHover(null));

    attachCanvasMouse(this.canvas, () => this.layout, {
      onHover: (cell, event) => this.onHover(cell, event),
      onLeave: () => {
        if (!this.tooltip.pinned) {
          this.tooltip.hide();
          this.setHover(null);
        }
      },
      onClick: (cell, event) => this.onClick(cell, event),
      onBand: (band) => {
        this.band = band;
        this.redrawOverlay();
      },
      onZoom: (c0, c1) => this.zoomTo(c0, c1),
    });
  }

  async start() {
    try {
      this.info = await api.info();
    } catch (e) {
      this.showMessage(`NanWatch could not load its statistics table: ${e.message}`);
      return;
    }
    setTable(this.info);
    this.restoreView();
    setStatusColours(this.info);
    watchDarkMode((dark) => {
      document.body.classList.toggle("nw-dark", dark);
      setTheme(this.root);
      if (this.heat && this.layout) this.drawGrid();
    });
    this.toolbar.setInfo(this.info);
    this.followReload();
    setInterval(() => {
      if (!document.hidden && Date.now() - this.lastRefresh >= POLL_MS) this.refresh();
    }, 5000);
    let width = this.root.clientWidth;
    new ResizeObserver(() => {
      if (Math.abs(this.root.clientWidth - width) < 8) return;
      width = this.root.clientWidth;
      clearTimeout(this.resizeTimer);
      this.resizeTimer = setTimeout(() => this.refresh(), 200);
    }).observe(this.root);
    await this.refresh();
  }

  // TensorBoard's plugin host broadcasts "experimental.DataReloaded" over a MessagePort
  // after every reload (the button and auto-reload); a 30 s poll covers hosts without it.
  followReload() {
    if (window.parent === window) return;
    const channel = new MessageChannel();
    channel.port1.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!message || message.isReply) return;
      if (message.type === "experimental.DataReloaded") this.refresh();
      channel.port1.postMessage(JSON.stringify({type: message.type, id: message.id, payload: null, error: null, isReply: true}));
    };
    window.parent.postMessage("experimental.bootstrap", "*", [channel.port2]);
  }

  // The view a link or a reload asks for (run, statistic, kind, steps source, zoom).
  restoreView() {
    const view = readView();
    if (view.run !== undefined) this.state.key = JSON.stringify([view.run, view.group === undefined ? null : view.group]);
    this.state.stat = this.info.stats.some((s) => s.name === view.stat) ? view.stat : this.info.default_stat;
    if (this.info.kinds.some((k) => k.name === view.kind)) this.state.kind = view.kind;
    if (view.source === "flight") this.state.source = "flight";
    if (view.range) {
      this.state.range = view.range;
      this.state.zoom = [null];   // "Zoom out" goes back to every step
    }
  }

  saveView() {
    const sel = this.selected();
    if (!sel) return;
    writeView({run: sel.run, group: sel.group, stat: this.state.stat, kind: this.state.kind,
      source: this.state.source, range: this.state.range});
  }

  update(changes) {
    Object.assign(this.state, changes);
    this.tooltip.unpin();
    this.tooltip.hide();
    this.refresh();
  }

  zoomTo(c0, c1) {
    const h = this.heat;
    if (!h || !h.n_columns || (c0 === 0 && c1 === h.n_columns - 1 && h.rows_per_column.every((n) => n === 1))) return;
    const zoom = this.state.zoom.concat([this.state.range]);
    this.update({zoom, range: {first: h.first_steps[c0], last: h.last_steps[c1]}});
  }

  selected() {
    return this.runs.find((r) => r.key === this.state.key) || null;
  }

  contentWidth() {
    const cs = getComputedStyle(this.root);
    return Math.max(200, this.root.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight));
  }

  columnsWanted() {
    const width = this.contentWidth();
    return Math.max(1, Math.min(this.info.max_columns, Math.floor(width - this.labelW - 14)));
  }

  async refresh() {
    const token = ++this.token;
    this.lastRefresh = Date.now();
    try {
      const [groups, overview] = await Promise.all([api.groups(), api.overview().catch(() => [])]);
      if (token !== this.token) return;
      const lines = new Map((overview || []).map((o) => [JSON.stringify([o.run, o.group]), o]));
      this.runs = [];
      for (const [run, gs] of Object.entries(groups)) {
        for (const g of gs) {
          const key = JSON.stringify([run, g]);
          const line = lines.get(key) || null;
          this.runs.push({key, run, group: g, line, state: stateWords(line), title: stateTitle(line)});
        }
      }
      this.drawOverview();
      this.toolbar.setEmpty(!this.runs.length);
      if (!this.runs.length) {
        this.toolbar.setRuns([], null);
        this.showMessage("No NanWatch data yet. Train with tb_nanwatch.NanWatchCallback(logdir) and point TensorBoard at that logdir; this tab follows TensorBoard's reload.");
        return;
      }
      if (!this.selected()) {
        this.state.key = this.runs[0].key;
        this.state.range = null;
        this.state.zoom = [];
      }
      this.toolbar.setRuns(this.runs, this.state.key);
      const sel = this.selected();
      const params = {
        run: sel.run,
        group: sel.group,
        stat: this.state.stat,
        kind: this.state.kind,
        source: this.state.source,
        columns: this.columnsWanted(),
      };
      if (this.state.range) {
        params.first_step = this.state.range.first;
        params.last_step = this.state.range.last;
      }
      this.fetchSigns(sel);
      const [first, heat] = await Promise.all([api.firstNonfinite(sel.run, sel.group), api.heatmap(params)]);
      if (token !== this.token) return;
      if (this.state.source === "flight" && !heat.flight_range) {
        this.state.source = "rows";
        return this.refresh();
      }
      this.first = first;
      this.heat = heat;
      this.eventsByColumn = new Map();
      for (const e of heat.events || []) {
        if (e.column === null || e.column === undefined) continue;
        if (!this.eventsByColumn.has(e.column)) this.eventsByColumn.set(e.column, []);
        this.eventsByColumn.get(e.column).push(e);
      }
      this.cellCache.clear();
      this.draw();
      this.saveView();
    } catch (e) {
      if (token === this.token) this.showMessage(`NanWatch: ${e.message}`);
    }
  }

  // The runs overview: one line counting the runs by state, opening to every run's state
  // (a click selects it).
  drawOverview() {
    const box = this.overview;
    box.replaceChildren();
    box.hidden = this.runs.length < 2;
    if (box.hidden) return;
    const count = (state) => this.runs.filter((r) => r.line && r.line.state === state).length;
    const bad = count("nonfinite");
    const skips = count("skips");
    const parts = [`${plural(bad, "run")} with a non-finite value`];
    if (skips) parts.push(`${skips} with loss-scale skips only`);
    parts.push(`${count("healthy")} ${runStateWords("healthy")}`);
    if (count("no_progress")) parts.push(`${count("no_progress")} ${runStateWords("no_progress")} without progress`);
    const summary = el("summary", "nw-overview-summary", `${plural(this.runs.length, "run")}: ${parts.join(", ")}`);
    summary.title = ["healthy", "no_progress"].map((s) => `${runStateWords(s)}: ${runStateMeaning(s)}`).join("\n");
    box.appendChild(summary);
    const list = el("table", "nw-overview-list");
    for (const r of this.runs) {
      const tr = el("tr", r.line ? `nw-overview-${r.line.state}` : "");
      tr.appendChild(el("td", "nw-overview-run", r.group ? `${r.run} \u00b7 ${r.group}` : r.run));
      tr.appendChild(el("td", "nw-overview-state", r.state || "\u2013"));
      tr.title = r.title || "";
      tr.addEventListener("click", () => {
        this.overview.open = false;
        this.update({key: r.key, range: null, zoom: [], source: "rows"});
      });
      list.appendChild(tr);
    }
    box.appendChild(list);
  }

  // Warning signs come on their own (they can take longer than the heatmap on a big run):
  // the banner shows them when they arrive, and keeps the last ones until then.
  fetchSigns(sel) {
    const key = sel.key;
    api.precursors(sel.run, sel.group).then((list) => {
      if (!Array.isArray(list)) list = [];
      const same = this.signs && this.signs.key === key && JSON.stringify(this.signs.list) === JSON.stringify(list);
      if (same) return;
      this.signs = {key, list};
      if (this.heat && this.heatKey() === key && !this.banner.hidden) this.drawBanner();
    }, () => {});
  }

  heatKey() {
    return this.heat ? JSON.stringify([this.heat.run, this.heat.group]) : null;
  }

  showMessage(text) {
    this.message.textContent = text;
    this.message.hidden = false;
    this.stack.hidden = true;
    this.hint.hidden = true;
    this.legend.hidden = true;
    this.modelNote.hidden = true;
    this.banner.hidden = true;
  }

  draw() {
    const heat = this.heat;
    this.toolbar.setState(this.state, this.info, heat);
    this.drawBanner();
    this.message.hidden = true;
    this.legend.hidden = false;
    const stat = this.info.stats.find((s) => s.name === heat.stat);
    const scale = makeScale(heat, stat, this.state.colour === "row");
    this.scale = scale;
    drawLegend(this.legend, scale, heat);
    this.modelNote.textContent = modelRowWords(heat);
    this.modelNote.hidden = !this.modelNote.textContent;
    if (!heat.n_columns || !heat.n_sites) {
      this.stack.hidden = true;
      this.hint.hidden = true;
      if (!heat.n_sites && heat.kind === "all") this.legend.hidden = true;   // nothing to colour
      this.message.hidden = false;
      this.message.textContent = heat.n_sites
        ? "No logged rows in this step range."
        : heat.kind === "all"
          ? ((heat.warnings || []).length
            ? "No readable rows or site list in this run: see what was left out, above."
            : "No rows or site list in this run: it holds only its first non-finite record (the run was " +
              "killed before its first row was due), shown above.")
          : `No site of kind \u201c${kindWords(heat.kind)}\u201d in this run.`;
      this.layout = null;
      return;
    }
    this.stack.hidden = false;
    this.hint.hidden = false;
    const key = this.heatKey();
    if (this.openFor !== key) {
      // A run's first view: open groups while everything fits, the first non-finite
      // site's groups first; scroll back to the top.
      const first = heat.first_nonfinite_cell;
      this.open = initialOpen(heat, this.fitRows(), first && first.path ? first.path : []);
      this.openFor = key;
      this.stack.scrollTop = 0;
      this.drawGrid();
      this.scrollToShownRow(this.layout.hm.first_nonfinite_cell ? shownRowFor(heat, this.shown, first.row) : -1);
    }
    this.drawGrid();
    const guessedLabelW = this.labelW;
    this.labelW = this.layout.gridX;
    if (this.layout.colW < 1 && this.labelW > guessedLabelW) {
      // More columns than pixels (this run's labels are wider than the last run's):
      // ask again, or scaling down would drop columns, and with them NaN cells.
      this.refresh();
      return;
    }
    this.canvas.dataset.columns = String(heat.n_columns);
    this.canvas.dataset.sites = String(heat.n_sites);
  }

  // The shown row holding the first non-finite cell (itself or a closed ancestor), or -1.
  firstShownRow() {
    const first = this.heat && this.heat.first_nonfinite_cell;
    return first ? shownRowFor(this.heat, this.shown, first.row) : -1;
  }

  // Rows that fit in the window below the toolbar and banner.
  maxCanvasHeight() {
    const top = this.stack.getBoundingClientRect().top + window.scrollY;
    return Math.max(240, Math.floor(window.innerHeight - top - 36));
  }

  fitRows() {
    return Math.max(1, Math.floor((this.maxCanvasHeight() - heightFor(this.heat, 0)) / ROW_H));
  }

  // Draws the rows shown at the current scroll position.
  drawGrid() {
    const heat = this.heat;
    this.shown = heat.rows ? visibleRows(heat, this.open) : heat.sites.map((_, i) => i);
    const maxHeight = Math.min(this.maxCanvasHeight(), heightFor(heat, this.shown.length));
    const first = heat.first_nonfinite_cell;
    const view = {
      shown: this.shown,
      open: this.open,
      offset: Math.floor(this.stack.scrollTop / ROW_H),
      firstRow: first ? shownRowFor(heat, this.shown, first.row) : -1,
      hasChildren: (r) => Boolean(heat.rows) && hasChildren(heat, r),
      key: (r) => rowKey(heat.rows[r]),
    };
    this.layout = drawHeatmap(this.canvas, heat, view, this.scale, this.contentWidth(), maxHeight);
    this.stack.style.height = `${this.layout.height}px`;
    this.spacer.style.height = `${Math.max(0, heightFor(heat, this.shown.length) - this.layout.height)}px`;
    this.canvas.dataset.rows = String(this.shown.length);
    // A reload redraws under the mouse: keep the highlight while it still points at a cell.
    if (this.hover && (this.hover.row >= this.shown.length || this.hover.col >= heat.n_columns)) this.hover = null;
    this.redrawOverlay();
  }

  // Opens or closes a row (a group or a layer) of the shown rows.
  // Is this shown row the layer row named after the model (its input and loss)?
  isModelRow(shownRow) {
    const heat = this.heat;
    const r = this.shown ? this.shown[shownRow] : undefined;
    const row = heat && heat.rows && r !== undefined ? heat.rows[r] : null;
    return Boolean(row && row.level === "layer" && row.name === modelName(heat));
  }

  toggle(shownRow) {
    const r = this.shown[shownRow];
    if (r === undefined || !this.heat.rows || !hasChildren(this.heat, r)) return;
    const key = rowKey(this.heat.rows[r]);
    if (this.open.has(key)) this.open.delete(key);
    else this.open.add(key);
    this.tooltip.unpin();
    this.tooltip.hide();
    this.hover = null;
    this.drawGrid();
  }

  // Opens the groups and the layer above the first non-finite site and scrolls to it.
  jumpToFirst() {
    const first = this.heat && this.heat.first_nonfinite_cell;
    if (!first) return;
    for (const r of first.path || []) this.open.add(rowKey(this.heat.rows[r]));
    this.drawGrid();
    this.scrollToShownRow(this.shown.indexOf(first.row), true);
    this.drawGrid();
    this.stack.scrollIntoView({block: "nearest"});
  }

  // Scrolls the rows so that shown row `k` is in sight (centred when it was not, or `centre`).
  scrollToShownRow(k, centre = false) {
    if (k < 0 || !this.layout) return;
    const fit = this.layout.nShown;
    const top = Math.floor(this.stack.scrollTop / ROW_H);
    if (!centre && k >= top && k < top + fit) return;
    this.stack.scrollTop = Math.max(0, (k - Math.floor(fit / 2)) * ROW_H);
  }

  drawBanner() {
    const b = this.banner;
    b.replaceChildren();
    b.hidden = false;
    const first = this.first;
    const heat = this.heat;
    const sel = this.selected();
    const signs = this.signs && this.signs.key === this.heatKey() ? this.signs.list : [];
    const skips = skipWords(heat);
    const collapse = eventCount(heat, "loss_scale_collapse");
    const warned = eventCount(heat, "early_warning");   // a finite run on course to overflow
    if (!first) {
      const dropped = Array.isArray(heat.warnings) && heat.warnings.length;
      b.className = `nw-banner ${signs.length || collapse || warned || dropped ? "nw-banner-warn" : "nw-banner-ok"}`;
      const r = heat.step_range;
      const span = r ? `${r.rows} logged rows, steps ${r.first}\u2013${r.last}` : "";
      if (skips) {
        b.appendChild(el("div", "nw-headline", `No NaN or Inf in the model: ${skips}`));
        b.appendChild(el("div", "nw-banner-sub", `${sel.run}${span ? ": " + span : ""}. Grey ticks in the lane above the ` +
          "heatmap mark the skipped steps: there the scaled gradients overflowed, so the optimizer skipped the " +
          "update and lowered the loss scale. Those Inf/NaN gradients are not a blow-up."));
      } else {
        b.appendChild(el("div", "nw-headline", span ? `No NaN or Inf in ${sel.run}: ${span}.` : `No NaN or Inf in ${sel.run}.`));
      }
      this.drawSigns(b, signs, "Warning signs:");
    } else {
      b.className = "nw-banner nw-banner-bad";
      b.appendChild(el("div", "nw-headline", headline(first)));
      const by = Array.isArray(first.backward_of) ? first.backward_of.filter((x) => x !== "") : [];
      if (by.length) {
        b.appendChild(el("div", "nw-first-detail", `Computed in the backward pass of ${listWords(by)}.`));
      }
      const props = Array.isArray(first.propagators) ? first.propagators : [];
      if (props.length) {
        const line = el("div", "nw-propagated");
        const shown = 6;
        line.appendChild(el("span", "nw-prop-lead", `Then in step ${first.step}, ${props.length} more site${props.length === 1 ? "" : "s"}: `));
        const list = el("span", "nw-prop-list", props.slice(0, shown).map(siteLabel).join(", "));
        line.appendChild(list);
        if (props.length > shown) {
          const more = el("button", "nw-link", `\u2026 show all ${props.length}`);
          more.type = "button";
          more.addEventListener("click", () => {
            list.textContent = props.map(siteLabel).join(", ");
            more.remove();
          });
          line.appendChild(more);
        }
        b.appendChild(line);
      }
      this.drawSigns(b, signs, "Warning signs before it:");
      const notes = el("div", "nw-banner-actions");
      if (heat.first_nonfinite_cell) {
        const jump = el("button", "nw-button nw-jump", `Show ${siteLabel(first)} at ${
          columnWords(heat, heat.first_nonfinite_cell.column) === String(first.step) ? "step " + first.step
            : "steps " + columnWords(heat, heat.first_nonfinite_cell.column)}`);
        jump.type = "button";
        jump.title = "open its layer and scroll to its row";
        jump.addEventListener("click", () => this.jumpToFirst());
        notes.appendChild(jump);
      } else if (heat.n_sites || this.state.kind !== "all") {   // a run with no rows at all says so below
        const why = this.state.kind !== "all" && first.kind !== this.state.kind
          ? `not in this view (kind \u201c${kindWords(first.kind)}\u201d)`
          : "not in this step range";
        notes.appendChild(el("span", "nw-note", `The first non-finite cell is ${why}.`));
      }
      if (heat.flight_range && this.state.source === "rows") {
        const go = el("button", "nw-button nw-flight", `Steps ${heat.flight_range.first}\u2013${heat.flight_range.last} one by one (flight recorder)`);
        go.type = "button";
        go.addEventListener("click", () => this.update({source: "flight", range: null, zoom: []}));
        notes.appendChild(go);
      }
      if (notes.childNodes.length) b.appendChild(notes);
      if (skips) {
        b.appendChild(el("div", "nw-event", `Also ${skips}, marked by grey ticks in the lane above the heatmap: their ` +
          "Inf/NaN gradients are the scaled gradients that overflowed, not the blow-up."));
      }
    }
    renderDiagnosis(b, {run: sel.run, group: sel.group, version: JSON.stringify(heat.step_range || null), blownUp: Boolean(first)});
    if (collapse && collapse.last) b.appendChild(el("div", "nw-event", collapseWords(collapse.last)));
    for (const e of heat.event_counts || []) {
      if (e.type === "loss_scale_skip" || e.type === "loss_scale_collapse") continue;
      b.appendChild(el("div", "nw-event", `${e.count} \u00d7 ${kindWords(e.type)} logged.`));
    }
    // A script re-run into the same run directory: the sessions are named, the latest shown.
    if (heat.session_warning) {
      b.appendChild(el("div", "nw-event nw-sessions", `This run has ${heat.session_warning}.`));
    }
    // Records the reader's gate dropped (damaged or malformed): said, never hidden.
    const dropped = Array.isArray(heat.warnings) ? heat.warnings : [];
    if (dropped.length) {
      const more = dropped.length > 1 ? ` (and ${dropped.length - 1} more tag${dropped.length > 2 ? "s" : ""})` : "";
      b.appendChild(el("div", "nw-event nw-dropped", `Left out as unreadable: ${dropped[0]}${more}.`));
    }
  }

  // Up to five warning signs (finite values that often cause the blow-up), as text.
  drawSigns(b, signs, lead) {
    if (!signs.length) return;
    const box = el("div", "nw-precursors");
    box.appendChild(el("div", "nw-precursor-lead", lead));
    const list = el("ul", "nw-precursor-list");
    for (const p of signs.slice(0, 5)) list.appendChild(el("li", "nw-precursor", `step ${p.step}: ${p.text}`));
    if (signs.length > 5) {
      list.appendChild(el("li", "nw-precursor-more", `\u2026 and ${signs.length - 5} more (tb-nanwatch report lists them all)`));
    }
    box.appendChild(list);
    b.appendChild(box);
  }

  setHover(cell) {
    this.hover = cell;
    this.redrawOverlay();
  }

  redrawOverlay() {
    if (this.layout) drawOverlay(this.overlay, this.layout, this.hover, this.band);
  }

  cellInfo(cell) {
    const h = this.heat;
    const r = this.shown[cell.row];
    const i = r * h.n_columns + cell.col;
    const node = h.rows ? h.rows[r] : null;
    const siteIndex = node ? node.site : h.sites[r].index;
    const site = siteIndex !== undefined ? h.sites.find((s) => s.index === siteIndex) : null;
    const first = h.first_nonfinite_cell;
    const holdsFirst = first && first.column === cell.col && (first.row === r || (first.path || []).includes(r));
    return {
      site,
      node,
      label: site ? site.label : node.name,
      firstStep: h.first_steps[cell.col],
      lastStep: h.last_steps[cell.col],
      rows: h.rows_per_column[cell.col],
      status: this.info.status[h.status[i]] || "?",
      late: Boolean(h.late && h.late[i]),
      value: h.values[i],
      statName: h.stat,
      source: h.source,
      first: holdsFirst && this.first ? headline(this.first) : null,
      notes: columnNotes(this.eventsByColumn.get(cell.col) || []),
      key: `${h.run}|${h.group}|${h.source}|${node ? rowKey(node) : siteIndex}|${h.first_steps[cell.col]}|${h.last_steps[cell.col]}`,
    };
  }

  showCell(cell, event) {
    const info = this.cellInfo(cell);
    if (!info.site) {
      // A group or layer row: its statistic and status over its sites; each site has its own row.
      const n = info.node.n_sites;
      this.tooltip.show(info.key, info, {note: `${info.node.level} of ${n} site${n === 1 ? "" : "s"}: click its name to open it`},
        this.info, event);
      return;
    }
    const cached = this.cellCache.get(info.key);
    this.tooltip.show(info.key, info, cached || null, this.info, event);
    if (cached) return;
    clearTimeout(this.cellTimer);
    this.cellTimer = setTimeout(async () => {
      const h = this.heat;
      try {
        const detail = await api.cell({run: h.run, group: h.group, source: h.source, site: info.site.index,
          first_step: info.firstStep, last_step: info.lastStep});
        if (this.cellCache.size > 500) this.cellCache.clear();
        this.cellCache.set(info.key, detail);
        if (this.tooltip.key === info.key) this.tooltip.show(info.key, info, detail, this.info, null);
      } catch (e) {
        if (this.tooltip.key === info.key) this.tooltip.show(info.key, info, {error: e.message}, this.info, null);
      }
    }, 60);
  }

  onHover(cell, event) {
    if (this.tooltip.pinned) return;
    this.canvas.title = cell.gutter && this.isModelRow(cell.row) ? modelRowWords(this.heat) : "";
    if (cell.gutter) {
      this.canvas.style.cursor = "pointer";
      if (!this.tooltip.pinned) this.tooltip.hide();
      this.setHover(null);
      return;
    }
    this.canvas.style.cursor = "";
    if (!this.hover || this.hover.row !== cell.row || this.hover.col !== cell.col) {
      this.setHover(cell);
      this.showCell(cell, event);
    } else {
      this.tooltip.place(event);
    }
  }

  onClick(cell, event) {
    if (cell.gutter) {
      this.toggle(cell.row);
      return;
    }
    const same = this.hover && this.hover.row === cell.row && this.hover.col === cell.col;
    if (this.tooltip.pinned && same) {
      this.tooltip.unpin();
      return;
    }
    this.tooltip.pinned = false;
    this.setHover(cell);
    this.tooltip.pin();
    this.showCell(cell, event);
  }
}

export async function render() {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "./style.css";
  document.head.appendChild(link);
  document.body.classList.add("nw-body");
  const app = new App(document.body);
  window.__nanwatch = app; // for debugging from the console
  await app.start();
}
