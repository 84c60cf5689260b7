// The rows of the layers x steps view: which of /heatmap's `rows` (groups > layers >
// sites, pre-order) are shown, given the set of opened rows.  Pure functions, no DOM.

// The key a row keeps across reloads and zooms (its index may change with the data).
export function rowKey(row) {
  return row.level === "site" ? `site:${row.site}` : `${row.level}:${row.name}`;
}

// Indices into heat.rows of the rows shown: every top-level row, and the children of
// every opened row whose ancestors are all open.
export function visibleRows(heat, open) {
  const rows = heat.rows || [];
  const shown = [];
  const isShown = new Array(rows.length).fill(false);
  for (let i = 0; i < rows.length; i++) {
    const p = rows[i].parent;
    if (p === null || p === undefined || (isShown[p] && open.has(rowKey(rows[p])))) {
      isShown[i] = true;
      shown.push(i);
    }
  }
  return shown;
}

// Whether a row has rows below it (a group, or a layer with sites).
export function hasChildren(heat, i) {
  const rows = heat.rows;
  return i + 1 < rows.length && rows[i + 1].parent === i;
}

// The rows to open for a first view: groups in order, as long as the view still fits
// in `fit` rows; the groups above the first non-finite site first, so it is in sight.
export function initialOpen(heat, fit, firstPath) {
  const open = new Set();
  const rows = heat.rows || [];
  const tryOpen = (i) => {
    if (rows[i].level !== "group" || open.has(rowKey(rows[i]))) return;
    open.add(rowKey(rows[i]));
    if (visibleRows(heat, open).length > fit) open.delete(rowKey(rows[i]));
  };
  for (const i of firstPath || []) tryOpen(i);
  for (let i = 0; i < rows.length; i++) tryOpen(i);
  return open;
}

// The shown row standing for heat row `i`: itself, or its nearest shown ancestor.
export function shownRowFor(heat, shown, i) {
  const where = new Map(shown.map((r, k) => [r, k]));
  for (let r = i; r !== null && r !== undefined; r = heat.rows[r].parent) {
    if (where.has(r)) return where.get(r);
  }
  return -1;
}
