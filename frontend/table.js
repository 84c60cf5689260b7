// The statistics table from /info (tb_nanwatch/stats.py): kinds, statistics, statuses,
// their colours and words.  The frontend defines none of its own; every module reads
// them from here once `setTable(info)` has run.

export const table = {info: null};

export function setTable(info) {
  table.info = info;
}

// "optimizer_state" -> "optimizer state" (the table's words; an unknown kind as written).
export function kindWords(kind) {
  const k = (table.info.kinds || []).find((x) => x.name === kind);
  return k ? k.words : String(kind || "").replace(/_/g, " ");
}

export function statusWords(name) {
  return (table.info.status_words || {})[name] || name;
}

export function statusColour(name) {
  return (table.info.status_colours || {})[name] || null;
}

// [{name: "nan", words: "NaN"}, ...]: the element counts of non-finite values.
export function countStats() {
  return table.info.count_stats || [];
}

export function stat(name) {
  return table.info.stats.find((s) => s.name === name) || null;
}

// A run's state in words ("healthy", "finite", ...) and what it means (stats.py's table).
export function runStateWords(state) {
  return (table.info.run_state_words || {})[state] || state;
}

export function runStateMeaning(state) {
  return (table.info.run_state_meanings || {})[state] || "";
}
