// Controls: run / kind / statistic selectors, source toggle, zoom buttons, the canvas's
// mouse handling (hover, click to pin, drag to zoom) and the tooltip.  Every string
// from the logs is inserted with textContent.

import {formatNumber, hitTest, columnAt, css, textOn} from "./heatmap.js";
import {countStats, kindWords, statusWords} from "./table.js";

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function labelled(labelText, control) {
  const wrap = el("label", "nw-control");
  wrap.appendChild(el("span", "nw-control-label", labelText));
  wrap.appendChild(control);
  return wrap;
}

function fillSelect(select, options, value) {
  select.replaceChildren();
  for (const o of options) {
    const opt = document.createElement("option");
    opt.value = o.value;
    opt.textContent = o.text;
    if (o.title) opt.title = o.title;
    select.appendChild(opt);
  }
  if (value !== undefined && options.some((o) => o.value === value)) select.value = value;
}

// Sizes a select to its selected option's text, so that a long run label ("f_huge_data —
// +Inf at step 3 in dense") is never cut; the toolbar wraps instead when the line is full.
// Its tooltip repeats the whole text (an even longer label stops at the window's width).
let measureCanvas = null;
export function fitSelectToChoice(select, titleFromChoice = true) {
  const opt = select.options[select.selectedIndex];
  if (!opt) {
    select.style.width = "";
    return;
  }
  const style = getComputedStyle(select);
  measureCanvas = measureCanvas || document.createElement("canvas");
  const ctx = measureCanvas.getContext("2d");
  ctx.font = `${style.fontStyle} ${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
  const box = ["paddingLeft", "paddingRight", "borderLeftWidth", "borderRightWidth"]
    .reduce((sum, k) => sum + (parseFloat(style[k]) || 0), 0);
  const arrow = 24;  // the drop-down arrow Chromium and Firefox draw inside the box
  select.style.width = `${Math.ceil(ctx.measureText(opt.textContent).width + box + arrow)}px`;
  if (titleFromChoice) select.title = opt.title ? `${opt.textContent}\n${opt.title}` : opt.textContent;
}

// The toolbar.  `handlers`: onRun(key), onKind(kind), onStat(stat), onSource(source),
// onColour("shared" | "row"), onZoomOut(), onZoomReset(), onReload().
export function buildToolbar(root, handlers) {
  const bar = el("div", "nw-toolbar");
  const run = el("select", "nw-run");
  const kind = el("select", "nw-kind");
  const stat = el("select", "nw-stat");
  const source = el("select", "nw-source");
  run.addEventListener("change", () => {
    fitSelectToChoice(run);
    handlers.onRun(run.value);
  });
  kind.addEventListener("change", () => handlers.onKind(kind.value));
  stat.addEventListener("change", () => handlers.onStat(stat.value));
  source.addEventListener("change", () => handlers.onSource(source.value));
  for (const c of [kind, stat, source]) c.addEventListener("change", () => fitSelectToChoice(c, false));
  const colour = el("select", "nw-colour");
  fillSelect(colour, [{value: "shared", text: "one scale"}, {value: "row", text: "per-row scale",
    title: "each row from its own min to its own max: shows a site's trend"}], "shared");
  colour.addEventListener("change", () => {
    fitSelectToChoice(colour, false);
    handlers.onColour(colour.value);
  });
  bar.appendChild(labelled("Run", run));
  bar.appendChild(labelled("Kind", kind));
  bar.appendChild(labelled("Statistic", stat));
  // These two read without a label (their options say what they do): one toolbar line at 1024 px.
  source.title = "steps: the logged rows, or the flight recorder's steps one by one";
  colour.title = "colour scale: one for every row, or each row from its own min to max";
  bar.appendChild(source);
  bar.appendChild(colour);

  const zoom = el("span", "nw-zoom");
  const zoomOut = el("button", "nw-zoom-out", "Zoom out");
  const zoomReset = el("button", "nw-zoom-reset", "All steps");
  zoomOut.type = zoomReset.type = "button";
  zoomOut.addEventListener("click", () => handlers.onZoomOut());
  zoomReset.addEventListener("click", () => handlers.onZoomReset());
  const zoomText = el("span", "nw-zoom-text");
  zoom.appendChild(zoomText);
  zoom.appendChild(zoomOut);
  zoom.appendChild(zoomReset);

  const reload = el("button", "nw-reload", "\u21bb");
  reload.type = "button";
  reload.title = "Reload now (also follows TensorBoard's reload)";
  reload.addEventListener("click", () => handlers.onReload());
  bar.appendChild(reload);
  root.appendChild(bar);

  // Under the toolbar: what the statistic means, and the steps in view (so the toolbar
  // itself stays one line at 1024 px).
  const line = el("div", "nw-subbar");
  const meaning = el("div", "nw-stat-meaning");
  line.appendChild(meaning);
  line.appendChild(zoom);
  root.appendChild(line);

  return {
    // No run to show: every control but reload off, nothing under the toolbar.
    setEmpty(empty) {
      for (const c of [run, kind, stat, source, colour, zoomOut, zoomReset]) c.disabled = empty;
      line.hidden = empty;
    },
    setInfo(info) {
      fillSelect(kind, [{value: "all", text: "all kinds"}].concat(
        info.kinds.map((k) => ({value: k.name, text: kindWords(k.name), title: k.meaning}))));
      fillSelect(stat, info.stats.map((s) => ({value: s.name, text: s.name, title: s.meaning})));
    },
    // `runs`: [{key, run, group, state}] (state: the /overview line in words, or "").
    setRuns(runs, selected) {
      fillSelect(run, runs.map((r) => ({value: r.key, title: r.title || "",
        text: (r.group ? `${r.run} \u00b7 ${r.group}` : r.run) + (r.state ? ` \u2014 ${r.state}` : "")})), selected);
      run.disabled = runs.length === 0;
      fitSelectToChoice(run);
    },
    setState(state, info, heat) {
      kind.value = state.kind;
      colour.value = state.colour;
      stat.value = state.stat;
      const s = info.stats.find((x) => x.name === state.stat);
      meaning.textContent = s ? `${s.name}: ${s.meaning}` : "";
      const flight = heat && heat.flight_range;
      fillSelect(source, [
        {value: "rows", text: "logged rows"},
        {value: "flight", text: flight ? "flight recorder" : "flight recorder (none)",
          title: flight ? `steps ${flight.first}\u2013${flight.last}, one by one: the steps just before the first non-finite value`
            : "this run has no flight recorder: it never went non-finite"},
      ], state.source);
      source.options[1].disabled = !flight;
      // Each select as wide as its choice: the run's long label and the rest on one line.
      for (const c of [kind, stat, source, colour]) fitSelectToChoice(c, false);
      zoomOut.disabled = state.zoom.length === 0;
      zoomReset.disabled = state.zoom.length === 0;
      if (heat && heat.n_columns) {
        const a = heat.first_steps[0];
        const b = heat.last_steps[heat.n_columns - 1];
        const rows = heat.logged_rows ?? heat.rows_per_column.reduce((x, y) => x + y, 0);
        const per = heat.n_columns < rows ? `, ${heat.n_columns} columns` : "";
        zoomText.textContent = `steps ${a}\u2013${b} (${rows} ${heat.source === "flight" ? "steps" : "rows"}${per})`;
      } else {
        zoomText.textContent = "";
      }
    },
  };
}

// Mouse handling on the heatmap.  `handlers`: onHover(cell, event), onLeave(),
// onClick(cell, event), onZoom(col0, col1), onBand(band or null).
export function attachCanvasMouse(target, getLayout, handlers) {
  let drag = null;
  const pos = (event) => {
    const r = target.getBoundingClientRect();
    return {x: event.clientX - r.left, y: event.clientY - r.top};
  };
  target.addEventListener("mousedown", (event) => {
    const layout = getLayout();
    const p = pos(event);
    const cell = hitTest(layout, p.x, p.y);
    if (!cell || cell.gutter || event.button !== 0) return;
    drag = {start: cell.col, x: p.x, moved: false};
    // No preventDefault: the iframe must take the focus (Escape unpins).  The stack has
    // user-select: none, so dragging selects no text.
    window.focus();
  });
  window.addEventListener("mousemove", (event) => {
    const layout = getLayout();
    if (!layout) return;
    const p = pos(event);
    if (drag) {
      if (Math.abs(p.x - drag.x) > 4) drag.moved = true;
      if (drag.moved) {
        handlers.onBand([drag.start, columnAt(layout, p.x)]);
        return;
      }
    }
    if (event.target !== target) return;
    const cell = hitTest(layout, p.x, p.y);
    if (cell) handlers.onHover(cell, event);
    else handlers.onLeave();
  });
  window.addEventListener("mouseup", (event) => {
    if (!drag) {
      // A click on a row's name opens or closes it.
      const layout = getLayout();
      const p = pos(event);
      const cell = event.target === target && event.button === 0 ? hitTest(layout, p.x, p.y) : null;
      if (cell && cell.gutter) handlers.onClick(cell, event);
      return;
    }
    const layout = getLayout();
    const d = drag;
    drag = null;
    const p = pos(event);
    if (d.moved && layout) {
      handlers.onBand(null);
      const end = columnAt(layout, p.x);
      handlers.onZoom(Math.min(d.start, end), Math.max(d.start, end));
      return;
    }
    const cell = hitTest(layout, p.x, p.y);
    if (cell) handlers.onClick(cell, event);
  });
  target.addEventListener("mouseleave", () => {
    if (!drag) handlers.onLeave();
  });
}

// The tooltip: every statistic of one cell (from /cell), pinned on click.
export class Tooltip {
  constructor(root, onUnpin) {
    this.el = el("div", "nw-tooltip");
    this.el.hidden = true;
    this.pinned = false;
    this.key = null;
    this.onUnpin = onUnpin;
    root.appendChild(this.el);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") this.unpin();
    });
  }

  place(event) {
    if (event) this.lastEvent = {clientX: event.clientX, clientY: event.clientY};
    event = event || this.lastEvent;
    if (!event) return;
    const pad = 14;
    const rect = this.el.getBoundingClientRect();
    let x = event.clientX + pad;
    let y = event.clientY + pad;
    if (x + rect.width > window.innerWidth - 4) x = Math.max(4, event.clientX - rect.width - pad);
    if (y + rect.height > window.innerHeight - 4) y = Math.max(4, window.innerHeight - rect.height - 4);
    this.el.style.left = `${x + window.scrollX}px`;
    this.el.style.top = `${y + window.scrollY}px`;
  }

  // `cell`: {site, firstStep, lastStep, rows, status, value, statName, first, notes}; `detail`:
  // /cell JSON or null; `info`: /info (statistics and status colours).
  show(key, cell, detail, info, event) {
    this.key = key;
    this.el.replaceChildren();
    this.el.classList.toggle("nw-pinned", this.pinned);
    const head = el("div", "nw-tip-head");
    head.appendChild(el("span", "nw-tip-label", cell.label || "(unnamed)"));
    if (this.pinned) {
      const close = el("button", "nw-tip-close", "\u00d7");
      close.type = "button";
      close.title = "Unpin (Esc)";
      close.addEventListener("click", () => this.unpin());
      head.appendChild(close);
    }
    this.el.appendChild(head);
    const steps = cell.firstStep === cell.lastStep ? `step ${cell.firstStep}` : `steps ${cell.firstStep}\u2013${cell.lastStep}`;
    const rowsWord = cell.source === "flight" ? "" : ` \u00b7 ${cell.rows} logged row${cell.rows === 1 ? "" : "s"}`;
    const what = cell.site ? `${cell.site.dtype || "?"} [${(cell.site.shape || []).join(", ")}]`
      : `${cell.node.level}, ${cell.node.n_sites} site${cell.node.n_sites === 1 ? "" : "s"}`;
    this.el.appendChild(el("div", "nw-tip-sub", `${steps}${rowsWord} \u00b7 ${what}`));
    const status = el("div", "nw-tip-status", statusWords(cell.status));
    status.title = (info.status_meanings || {})[cell.status] || "";
    const rgb = (info.status_colours || {})[cell.status];
    if (rgb) {
      status.style.background = css(rgb);
      status.style.color = textOn(rgb);
    }
    this.el.appendChild(status);
    if (cell.late) {
      this.el.appendChild(el("div", "nw-tip-event", "Striped: finite at the first non-finite step; it went " +
        "non-finite later in this column (propagated or broke later)."));
    }
    if (cell.first) this.el.appendChild(el("div", "nw-tip-first", `${cell.first} (in this cell)`));
    for (const note of cell.notes || []) this.el.appendChild(el("div", "nw-tip-event", note));

    const table = el("table", "nw-tip-stats");
    if (detail && detail.stats) {
      for (const s of info.stats) {
        const tr = el("tr", s.name === cell.statName ? "nw-current" : "");
        tr.title = s.meaning;
        tr.appendChild(el("th", "", s.name));
        tr.appendChild(el("td", "", formatNumber(detail.stats[s.name])));
        table.appendChild(tr);
      }
    } else {
      const tr = el("tr", "nw-current");
      tr.appendChild(el("th", "", cell.statName));
      tr.appendChild(el("td", "", formatNumber(cell.value)));
      table.appendChild(tr);
      const wait = el("tr");
      wait.appendChild(el("td", "nw-tip-wait", detail === null ? "loading every statistic\u2026"
        : String(detail.error || detail.note || "")));
      table.appendChild(wait);
    }
    this.el.appendChild(table);

    if (detail && detail.flight && detail.flight.length) {
      this.el.appendChild(el("div", "nw-tip-section", "flight recorder (this site, per step)"));
      const ft = el("table", "nw-tip-flight");
      const counts = countStats().map((c) => c.name);
      const cols = ["step"].concat(counts, cell.statName && !counts.includes(cell.statName) ? [cell.statName] : []);
      const hr = el("tr");
      for (const c of cols) hr.appendChild(el("th", "", c));
      ft.appendChild(hr);
      for (const row of detail.flight.slice(-10)) {
        const bad = counts.some((k) => row[k] > 0);
        const tr = el("tr", bad ? "nw-bad" : "");
        for (const c of cols) tr.appendChild(el("td", "", formatNumber(row[c])));
        ft.appendChild(tr);
      }
      this.el.appendChild(ft);
    }
    if (!this.pinned) this.el.appendChild(el("div", "nw-tip-hint", "click to pin \u00b7 drag to zoom"));
    this.el.hidden = false;
    this.place(event);
  }

  hide() {
    if (this.pinned) return;
    this.el.hidden = true;
    this.key = null;
  }

  pin() {
    this.pinned = true;
    this.el.classList.add("nw-pinned");
  }

  unpin() {
    if (!this.pinned) return;
    this.pinned = false;
    this.el.classList.remove("nw-pinned");
    this.el.hidden = true;
    this.key = null;
    if (this.onUnpin) this.onUnpin();
  }
}
