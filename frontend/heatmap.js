// Canvas drawing of the layers x steps heatmap, its colour scale and its legend.
// Strings from the logs (layer names) only ever reach the page through canvas fillText
// or textContent.

import {statusWords} from "./table.js";

// Status codes of stats.nonfinite_status (/info's `status` names them in this order).
export const STATUS = {FINITE: 0, NAN: 1, POSINF: 2, NEGINF: 3, MIXED: 4, ABSENT: 5};

// A status the table gives no colour: black, never a shade of the ramp.
const UNKNOWN_STATUS = [0, 0, 0];

// The colours of the non-finite statuses come from the statistics table (/info's
// `status_colours`, the same as `tb-nanwatch report --png`): [{status, name, colour}].
export let SPECIAL = [];
let SPECIAL_BY_STATUS = {};
export let NOT_MEASURED = [255, 255, 255];
let ZERO = NOT_MEASURED;
let RAMP = [[255, 255, 255], [0, 0, 0]];
// The first non-finite cell's frame: a line of FIRST_OUTLINE with one of FIRST_HALO inside.
let FIRST_OUTLINE = [0, 0, 0];
let FIRST_HALO = [255, 255, 255];

export function setStatusColours(info) {
  const colours = info.status_colours || {};
  SPECIAL = info.status
    .map((name, code) => ({status: code, name: statusWords(name), colour: colours[name] || UNKNOWN_STATUS}))
    .filter((s) => s.status !== STATUS.FINITE);
  SPECIAL_BY_STATUS = Object.fromEntries(SPECIAL.map((s) => [s.status, s.colour]));
  NOT_MEASURED = info.not_measured_colour;
  ZERO = info.zero_colour;
  RAMP = info.finite_ramp;
  FIRST_OUTLINE = info.first_cell_outline || FIRST_OUTLINE;
  FIRST_HALO = info.first_cell_halo || FIRST_HALO;
}

// Marks above the grid: a loss-scale skip (as report --png draws it), a collapsed loss scale.
export const SKIP_MARK = [120, 120, 120];
export const COLLAPSE_MARK = [66, 66, 66];
// The early warning (a site on course to overflow): a triangle above its column.
export const EARLY_MARK = [179, 71, 0];

// Colour of the text on a background of colour `rgb`: black or white, whichever reads.
export function textOn(rgb) {
  const lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2];
  return lum > 150 ? "#000" : "#fff";
}

// The table's ramp for finite values, light (low) to dark (high).
export function rampColour(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  const a = RAMP[i];
  const b = RAMP[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f));
}

export function css(rgb) {
  return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
}

export function formatNumber(v) {
  if (v === null || v === undefined) return "\u2013";
  if (typeof v === "string") return v === "Infinity" ? "+Inf" : v === "-Infinity" ? "\u2212Inf" : v;
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "\u2212Inf";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(4)));
}

// The colour scale of one statistic over the values on screen.  `scale` comes from the
// statistics table: log (magnitudes), linear, or count (0 at the bottom, log above).
// With `perRow`, every row (site) gets its own range, so a site's trend shows even
// when other sites are orders of magnitude bigger.
export function makeScale(hm, stat, perRow = false) {
  const kind = stat.scale;
  const range = (from, to) => {
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = from; i < to; i++) {
      const v = hm.values[i];
      if (!Number.isFinite(v)) continue;
      if (kind === "log" && v <= 0) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (lo === Infinity) {
      lo = kind === "linear" ? 0 : 1;
      hi = kind === "linear" ? 1 : 10;
    }
    if (kind === "count") {
      lo = 0;
      hi = Math.max(hi, 1);
    }
    return [lo, hi];
  };
  const [lo, hi] = range(0, hm.values.length);
  const rows = perRow
    ? Array.from({length: hm.n_rows}, (_, r) => range(r * hm.n_columns, (r + 1) * hm.n_columns))
    : null;
  const L = Math.log10;
  const t = (v, row) => {
    if (Number.isNaN(v)) return NaN;
    if (v === Infinity) return 1;
    if (v === -Infinity) return 0;
    const [a, b] = rows ? rows[row] : [lo, hi];
    if (kind === "log") {
      if (v <= 0) return 0;
      return b > a ? (L(v) - L(a)) / (L(b) - L(a)) : 0.5;
    }
    if (kind === "count") return Math.log1p(Math.max(0, v)) / Math.log1p(b);
    return b > a ? (v - a) / (b - a) : 0.5;
  };
  // Low is the danger (headroom): the ramp runs the other way, so danger reads dark.
  const reversed = stat.danger === "low";
  const shade = reversed ? (v, row) => 1 - t(v, row) : t;
  return {kind, lo, hi, t: shade, stat, perRow, reversed};
}

export function cellColour(status, value, scale, row) {
  if (status !== STATUS.FINITE) return SPECIAL_BY_STATUS[status] || UNKNOWN_STATUS;
  if (scale.kind === "log" && value === 0) return ZERO;   // an exact 0 has no place on a log ramp
  const t = scale.t(value, row);
  return Number.isNaN(t) ? NOT_MEASURED : rampColour(t);
}

const FONT = '11px "Roboto", "DejaVu Sans", Arial, sans-serif';
const BOLD = 'bold 11px "Roboto", "DejaVu Sans", Arial, sans-serif';
// Above the grid: step labels, their ticks (and the first cell's triangle), then, for a
// run with loss-scale events, a lane of TRACK_H pixels marking their columns.
const AXIS_H = 30;
const TRACK_H = 12;
const MARGIN_R = 12;
const MARGIN_B = 8;
// Rows: one height for every view, so labels always read; the canvas never grows past
// the height it is given (the rows scroll under a fixed axis instead).
export const ROW_H = 16;
const INDENT = 12;
const TWISTY_W = 12;
export const MAX_LABEL_W = 300;

// The theme's colours for what the canvas draws itself (set from CSS variables).
export const THEME = {text: "#212121", muted: "#616161", grid: "#9e9e9e", separator: "rgba(255, 255, 255, 0.75)",
  groupRule: "#cfd8dc", track: "#f0f0f0", halo: "#fff"};

export function setTheme(root) {
  const cs = getComputedStyle(root);
  const read = (name, fallback) => (cs.getPropertyValue(name) || "").trim() || fallback;
  THEME.text = read("--nw-text", THEME.text);
  THEME.muted = read("--nw-muted", THEME.muted);
  THEME.grid = read("--nw-grid", THEME.grid);
  THEME.separator = read("--nw-separator", THEME.separator);
  THEME.groupRule = read("--nw-group-rule", THEME.groupRule);
  THEME.track = read("--nw-track", THEME.track);
  THEME.halo = read("--nw-halo", THEME.halo);
}

function ellipsize(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  // Keep the end (tensor and kind) and the start (layer) visible.
  let keep = text.length;
  while (keep > 4) {
    keep -= 1;
    const head = Math.ceil(keep / 2);
    const candidate = text.slice(0, head) + "\u2026" + text.slice(text.length - (keep - head));
    if (ctx.measureText(candidate).width <= width) return candidate;
  }
  return "\u2026";
}

// What a heat row reads as in the gutter.
export function rowLabel(hm, i) {
  const row = hm.rows ? hm.rows[i] : null;
  if (row) return row.label || "(unnamed)";
  return hm.sites[i].label || "(unnamed)";
}

function rowDepth(hm, i) {
  return hm.rows ? hm.rows[i].depth : 0;
}

// Width the label gutter needs for the rows shown (bounded).
export function labelWidthFor(hm, shown) {
  const probe = document.createElement("canvas").getContext("2d");
  let w = 60;
  for (const i of shown) {
    probe.font = hm.rows && hm.rows[i].level !== "site" ? BOLD : FONT;
    w = Math.max(w, probe.measureText(rowLabel(hm, i)).width + rowDepth(hm, i) * INDENT);
  }
  return Math.min(MAX_LABEL_W, Math.ceil(w) + 14 + TWISTY_W);
}

// "95" for a one-step column, "0-94" for a wider one.
export function columnWords(hm, c) {
  const a = hm.first_steps[c];
  const b = hm.last_steps[c];
  return a === b ? String(a) : `${a}\u2013${b}`;
}

// Tick positions and labels of the step axis.  Few columns: each labelled with the step
// range it covers.  Many: round steps placed inside the column that holds them.
function stepTicks(ctx, hm, gridX, colW, maxTicks) {
  const n = hm.n_columns;
  const ticks = [];
  if (n <= maxTicks) {
    const words = Array.from({length: n}, (_, c) => columnWords(hm, c));
    const fits = words.every((w) => ctx.measureText(w).width + 6 <= colW);
    for (let c = 0; c < n; c++) {
      ticks.push({x: gridX + (c + 0.5) * colW, label: fits ? words[c] : String(hm.first_steps[c])});
    }
    return ticks;
  }
  const a = hm.first_steps[0];
  const b = hm.last_steps[n - 1];
  const raw = Math.max(1, (b - a + 1) / maxTicks);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw && Number.isInteger(x)) || 10 * mag;
  let c = 0;
  for (let v = Math.ceil(a / step) * step; v <= b; v += step) {
    while (c + 1 < n && hm.first_steps[c + 1] <= v) c++;
    const width = hm.last_steps[c] - hm.first_steps[c] + 1;
    const within = Math.min(1, Math.max(0, (v - hm.first_steps[c] + 0.5) / width));
    ticks.push({x: gridX + (c + within) * colW, label: String(v)});
  }
  return ticks;
}

// The height the canvas needs for `nRows` rows (before any limit).
export function heightFor(hm, nRows) {
  return AXIS_H + (hasTrack(hm) ? TRACK_H : 0) + nRows * ROW_H + MARGIN_B;
}

function hasTrack(hm) {
  const types = new Set((hm.event_counts || []).map((e) => e.type));
  return types.has("loss_scale_skip") || types.has("loss_scale_collapse") || types.has("early_warning");
}

// Lays out and draws the heatmap into `canvas` (CSS width `width`, at most `maxHeight`
// tall).  `view`: {shown: heat row indices in display order, open: Set of opened keys
// (for the twisties), offset: first shown row drawn, firstRow: the shown row holding
// the first non-finite cell or -1}.  Returns the layout used for hit testing.
export function drawHeatmap(canvas, hm, view, scale, width, maxHeight) {
  const shown = view.shown;
  const labelW = labelWidthFor(hm, shown);
  const rowH = ROW_H;
  const gridX = labelW;
  const types = new Set((hm.event_counts || []).map((e) => e.type));
  const track = hasTrack(hm) ? TRACK_H : 0;
  const gridY = AXIS_H + track;
  const gridW = Math.max(40, width - labelW - MARGIN_R);
  const fit = Math.max(1, Math.floor((maxHeight - gridY - MARGIN_B) / rowH));
  const offset = Math.max(0, Math.min(view.offset || 0, shown.length - fit));
  const nShown = Math.min(fit, shown.length - offset);
  const gridH = rowH * nShown;
  const height = gridY + gridH + MARGIN_B;
  const colW = hm.n_columns ? gridW / hm.n_columns : gridW;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;

  // Cells: one pixel per cell in an offscreen image, scaled up without smoothing.
  if (nShown && hm.n_columns) {
    const off = document.createElement("canvas");
    off.width = hm.n_columns;
    off.height = nShown;
    const octx = off.getContext("2d");
    const image = octx.createImageData(hm.n_columns, nShown);
    for (let k = 0; k < nShown; k++) {
      const r = shown[offset + k];
      for (let c = 0; c < hm.n_columns; c++) {
        const i = r * hm.n_columns + c;
        const rgb = cellColour(hm.status[i], hm.values[i], scale, r);
        const o = (k * hm.n_columns + c) * 4;
        image.data[o] = rgb[0];
        image.data[o + 1] = rgb[1];
        image.data[o + 2] = rgb[2];
        image.data[o + 3] = 255;
      }
    }
    octx.putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, gridX, gridY, gridW, gridH);
  }

  const layout = {gridX, gridY, gridW, gridH, rowH, colW, width, height, hm, track, shown, offset, nShown};
  drawLate(ctx, layout);

  // Row separators (a rule above every top-level row), twisties and labels in the gutter.
  ctx.textBaseline = "middle";
  for (let k = 0; k < nShown; k++) {
    const r = shown[offset + k];
    const row = hm.rows ? hm.rows[r] : null;
    const y = gridY + k * rowH;
    if (k > 0) {
      const top = row && row.depth === 0;
      ctx.fillStyle = top ? THEME.groupRule : THEME.separator;
      ctx.fillRect(top ? 0 : gridX, y - 0.5, top ? gridX + gridW : gridW, 1);
    }
    const x = 4 + (row ? row.depth * INDENT : 0);
    if (row && view.hasChildren(r)) {
      ctx.fillStyle = THEME.muted;
      ctx.textAlign = "left";
      ctx.fillText(view.open.has(view.key(r)) ? "\u25be" : "\u25b8", x, y + rowH / 2);
    }
    ctx.font = row && row.level !== "site" ? BOLD : FONT;
    ctx.fillStyle = row && row.level === "site" ? THEME.muted : THEME.text;
    ctx.textAlign = "left";
    ctx.fillText(ellipsize(ctx, rowLabel(hm, r), labelW - x - TWISTY_W - 8), x + TWISTY_W, y + rowH / 2);
    ctx.font = FONT;
  }

  // Step axis.
  ctx.textBaseline = "alphabetic";
  ctx.fillStyle = THEME.muted;
  ctx.textAlign = "right";
  const axisY = gridY - track;   // the bottom of the step axis
  const labelY = axisY - 10;
  ctx.fillText(hm.source === "flight" ? "step (one per column)" : "step", gridX - 8, labelY);
  const maxTicks = Math.max(2, Math.floor(gridW / 80));
  const ticks = stepTicks(ctx, hm, gridX, colW, maxTicks);
  for (const tick of ticks) {
    ctx.fillRect(tick.x - 0.5, axisY - 5, 1, 5);
    ctx.textAlign = "center";
    const w = ctx.measureText(tick.label).width;
    const tx = Math.min(Math.max(tick.x, gridX + w / 2 - 2), gridX + gridW - w / 2 + 8);
    ctx.fillText(tick.label, tx, labelY);
  }
  ctx.strokeStyle = THEME.grid;
  ctx.lineWidth = 1;
  ctx.strokeRect(gridX - 0.5, gridY - 0.5, gridW + 1, gridH + 1);

  if (track) drawTrack(ctx, layout, hm.events || [], types);
  const first = hm.first_nonfinite_cell;
  if (first && view.firstRow >= 0) markFirst(ctx, layout, view.firstRow, first.column);
  return layout;
}

// Cells of the first non-finite step's column that went non-finite only later in it:
// striped over their colour, so they are not read as bad at that very step.
function drawLate(ctx, layout) {
  const hm = layout.hm;
  if (!hm.late) return;
  ctx.save();
  ctx.beginPath();
  ctx.rect(layout.gridX, layout.gridY, layout.gridW, layout.gridH);
  ctx.clip();
  ctx.strokeStyle = "rgba(255, 255, 255, 0.85)";
  ctx.lineWidth = 1.5;
  for (let k = 0; k < layout.nShown; k++) {
    const r = layout.shown[layout.offset + k];
    for (let c = 0; c < hm.n_columns; c++) {
      if (!hm.late[r * hm.n_columns + c]) continue;
      const x = layout.gridX + c * layout.colW;
      const y = layout.gridY + k * layout.rowH;
      const w = Math.max(layout.colW, 2);
      ctx.save();
      ctx.beginPath();
      ctx.rect(x, y, w, layout.rowH);
      ctx.clip();
      ctx.beginPath();
      for (let d = -layout.rowH; d < w; d += 4) {
        ctx.moveTo(x + d, y + layout.rowH);
        ctx.lineTo(x + d + layout.rowH, y);
      }
      ctx.stroke();
      ctx.restore();
    }
  }
  ctx.restore();
}

// A shown row's rectangle in canvas coordinates (it may be scrolled out: y outside).
function cellRect(layout, row, col) {
  const x = layout.gridX + col * layout.colW;
  const y = layout.gridY + (row - layout.offset) * layout.rowH;
  return {x, y, w: Math.max(layout.colW, 1), h: layout.rowH};
}

// The lane above the grid for a run with loss-scale events: a grey tick above the
// column of every skip (its non-finite gradients are by design), a cross above the
// column where the loss scale collapsed.  Captioned in the label gutter.
function drawTrack(ctx, layout, events, types) {
  const top = layout.gridY - layout.track;
  const h = layout.track - 2;
  ctx.fillStyle = THEME.track;
  ctx.fillRect(layout.gridX, top, layout.gridW, h);
  ctx.save();
  ctx.font = '10px "Roboto", "DejaVu Sans", Arial, sans-serif';
  ctx.fillStyle = THEME.muted;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  const caption = types.has("loss_scale_skip") ? "loss-scale skips"
    : types.has("loss_scale_collapse") ? "loss scale" : "early warning";
  ctx.fillText(caption, layout.gridX - 8, top + h / 2);
  ctx.restore();
  const placed = (e) => e.column !== null && e.column !== undefined;
  ctx.fillStyle = css(SKIP_MARK);
  for (const e of events) {
    if (e.type !== "loss_scale_skip" || !placed(e)) continue;
    const x = layout.gridX + e.column * layout.colW;
    const w = layout.colW >= 4 ? layout.colW - 1 : Math.max(layout.colW, 2);
    ctx.fillRect(x, top + 1, w, h - 2);
  }
  for (const e of events) {
    if (e.type !== "loss_scale_collapse" || !placed(e)) continue;
    const cx = layout.gridX + (e.column + 0.5) * layout.colW;
    const cy = top + h / 2;
    const cross = () => {
      ctx.beginPath();
      ctx.moveTo(cx - 3.5, cy - 3.5);
      ctx.lineTo(cx + 3.5, cy + 3.5);
      ctx.moveTo(cx + 3.5, cy - 3.5);
      ctx.lineTo(cx - 3.5, cy + 3.5);
      ctx.stroke();
    };
    ctx.strokeStyle = "#fff";   // a halo: readable on a skip tick too
    ctx.lineWidth = 4;
    cross();
    ctx.strokeStyle = css(COLLAPSE_MARK);
    ctx.lineWidth = 1.8;
    cross();
  }
  ctx.lineWidth = 1;
  ctx.fillStyle = css(EARLY_MARK);
  for (const e of events) {
    if (e.type !== "early_warning" || !placed(e)) continue;
    const cx = layout.gridX + (e.column + 0.5) * layout.colW;
    ctx.beginPath();
    ctx.moveTo(cx, top + h - 1);
    ctx.lineTo(cx - 4.5, top + 1);
    ctx.lineTo(cx + 4.5, top + 1);
    ctx.closePath();
    ctx.fill();
  }
}

function markFirst(ctx, layout, row, col) {
  const r = cellRect(layout, row, col);
  const inView = row >= layout.offset && row < layout.offset + layout.nShown;
  const pad = 3;
  ctx.save();
  ctx.beginPath();
  ctx.rect(0, layout.gridY - pad - 1, layout.width, layout.gridH + 2 * pad + 2);
  ctx.clip();
  if (inView) drawFirstBox(ctx, r, pad);
  ctx.restore();
  // Triangles on the axis and at the gutter, so the cell is found even when 1 px wide
  // (the axis one also when its row is scrolled out of sight).
  ctx.fillStyle = THEME.text;
  const cx = r.x + r.w / 2;
  ctx.beginPath();
  const axisY = layout.gridY - layout.track;
  ctx.moveTo(cx - 4, axisY - 7);
  ctx.lineTo(cx + 4, axisY - 7);
  ctx.lineTo(cx, axisY - 1);
  ctx.fill();
  if (!inView) return;
  const cy = r.y + r.h / 2;
  ctx.beginPath();
  ctx.moveTo(layout.gridX - 7, cy - 4);
  ctx.lineTo(layout.gridX - 7, cy + 4);
  ctx.lineTo(layout.gridX - 2, cy);
  ctx.fill();
}

function drawFirstBox(ctx, r, pad) {
  ctx.lineWidth = 2.5;
  ctx.strokeStyle = css(FIRST_OUTLINE);
  ctx.strokeRect(r.x - pad, r.y - pad, r.w + 2 * pad, r.h + 2 * pad);
  ctx.lineWidth = 1;
  ctx.strokeStyle = css(FIRST_HALO);
  ctx.strokeRect(r.x - pad + 1.75, r.y - pad + 1.75, r.w + 2 * pad - 3.5, r.h + 2 * pad - 3.5);
}

// The overlay canvas: hover outline and the zoom band being dragged.
export function drawOverlay(canvas, layout, hover, band) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(layout.width * dpr);
  canvas.height = Math.round(layout.height * dpr);
  canvas.style.width = `${layout.width}px`;
  canvas.style.height = `${layout.height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, layout.width, layout.height);
  if (band) {
    const x0 = layout.gridX + Math.min(band[0], band[1]) * layout.colW;
    const x1 = layout.gridX + (Math.max(band[0], band[1]) + 1) * layout.colW;
    ctx.fillStyle = "rgba(255, 193, 7, 0.25)";
    ctx.fillRect(x0, layout.gridY, x1 - x0, layout.gridH);
    ctx.strokeStyle = "#ff8f00";
    ctx.lineWidth = 1;
    ctx.strokeRect(x0 + 0.5, layout.gridY + 0.5, x1 - x0 - 1, layout.gridH - 1);
  }
  if (hover && hover.row >= layout.offset && hover.row < layout.offset + layout.nShown) {
    const r = cellRect(layout, hover.row, hover.col);
    ctx.strokeStyle = "#ffb300";
    ctx.lineWidth = 2;
    ctx.strokeRect(r.x - 1, r.y - 1, r.w + 2, r.h + 2);
    ctx.fillStyle = "rgba(255, 179, 0, 0.12)";
    ctx.fillRect(layout.gridX, r.y, layout.gridW, r.h);
  }
}

// {row, col} of the cell under (x, y): `row` indexes the shown rows; {row, gutter: true}
// over a row's label; null elsewhere.
export function hitTest(layout, x, y) {
  if (!layout || !layout.hm.n_columns) return null;
  const k = Math.floor((y - layout.gridY) / layout.rowH);
  if (k < 0 || k >= layout.nShown) return null;
  const row = layout.offset + k;
  if (x < layout.gridX) return {row, gutter: true};
  const col = Math.floor((x - layout.gridX) / layout.colW);
  if (col < 0 || col >= layout.hm.n_columns) return null;
  return {row, col};
}

// Column under x, clamped to the grid (for dragging a zoom band past its edges).
export function columnAt(layout, x) {
  const col = Math.floor((x - layout.gridX) / layout.colW);
  return Math.max(0, Math.min(layout.hm.n_columns - 1, col));
}

// Legend: the ramp with its range, then the non-finite colours, the first-cell mark and,
// when the run has them, the marks of loss-scale skips and of a collapsed loss scale.
export function drawLegend(container, scale, hm) {
  container.replaceChildren();
  const ramp = document.createElement("div");
  ramp.className = "nw-legend-ramp";
  const title = document.createElement("span");
  title.className = "nw-legend-title";
  const scaleWord = {log: "log scale", linear: "linear scale", count: "count, log scale"}[scale.kind] || scale.kind;
  title.textContent = `${scale.stat.name} (${scaleWord})`;
  ramp.appendChild(title);
  const lo = document.createElement("span");
  lo.className = "nw-legend-tick";
  lo.textContent = scale.perRow ? "row min" : formatNumber(scale.kind === "count" ? 0 : scale.lo);
  ramp.appendChild(lo);
  const bar = document.createElement("canvas");
  bar.className = "nw-legend-bar";
  bar.width = 160;
  bar.height = 12;
  const bctx = bar.getContext("2d");
  for (let x = 0; x < bar.width; x++) {
    const along = x / (bar.width - 1);
    bctx.fillStyle = css(rampColour(scale.reversed ? 1 - along : along));
    bctx.fillRect(x, 0, 1, bar.height);
  }
  ramp.appendChild(bar);
  const hi = document.createElement("span");
  hi.className = "nw-legend-tick";
  hi.textContent = scale.perRow ? "row max" : formatNumber(scale.hi);
  ramp.appendChild(hi);
  container.appendChild(ramp);

  const swatches = document.createElement("div");
  swatches.className = "nw-legend-swatches";
  const entries = SPECIAL.map((s) => ({name: s.name, colour: s.colour}));
  if (scale.kind === "log") entries.push({name: "exactly 0", colour: ZERO});
  entries.push({name: "not measured", colour: NOT_MEASURED});
  for (const e of entries) {
    const sw = document.createElement("span");
    sw.className = "nw-swatch";
    sw.style.background = css(e.colour);
    swatches.appendChild(legendItem(sw, e.name));
  }
  const mark = document.createElement("span");
  mark.className = "nw-swatch nw-swatch-first";
  mark.style.borderColor = css(FIRST_OUTLINE);
  mark.style.outlineColor = css(FIRST_HALO);
  swatches.appendChild(legendItem(mark, "first non-finite value"));
  if (hm && hm.late && hm.late.some((x) => x)) {
    const stripes = document.createElement("span");
    stripes.className = "nw-swatch nw-swatch-late";
    swatches.appendChild(legendItem(stripes, "non-finite only later in that column"));
  }
  const types = new Set(((hm && hm.event_counts) || []).map((e) => e.type));
  const marks = [
    {type: "loss_scale_skip", className: "nw-mark-skip", text: "loss-scale skip (by design)"},
    {type: "loss_scale_collapse", className: "nw-mark-collapse", text: "loss scale collapsed"},
    {type: "early_warning", className: "nw-mark-early", text: "early warning (on course to overflow)"},
  ];
  for (const m of marks) {
    if (!types.has(m.type)) continue;
    const glyph = document.createElement("span");
    glyph.className = `nw-mark ${m.className}`;
    if (m.type === "loss_scale_skip") glyph.style.background = css(SKIP_MARK);
    else if (m.type === "early_warning") {
      glyph.style.color = css(EARLY_MARK);
      glyph.textContent = "\u25bc";
    } else {
      glyph.style.color = css(COLLAPSE_MARK);
      glyph.textContent = "\u00d7";
    }
    swatches.appendChild(legendItem(glyph, m.text, `nw-legend-${m.type.replace(/_/g, "-")}`));
  }
  container.appendChild(swatches);
}

/** One legend entry: a swatch or glyph, then its words. */
function legendItem(swatch, text, extraClass) {
  const item = document.createElement("span");
  item.className = extraClass ? `nw-legend-item ${extraClass}` : "nw-legend-item";
  item.appendChild(swatch);
  const label = document.createElement("span");
  label.textContent = text;
  item.appendChild(label);
  return item;
}
