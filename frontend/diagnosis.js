// The "Why" part of the banner: the ranked causes of the run (evidence quoted from the logs,
// the remedy with the Keras code to change) and the early warning, from the `/diagnosis`
// route (tb_nanwatch/http_api.md).  One call from the banner code: renderDiagnosis(banner, ...).

import {api} from "./data.js";

const SHOWN = 3;           // causes shown at once; the rest behind a button
const cache = new Map();   // key -> Promise of the route's answer

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fetchDiagnosis(run, group, version) {
  const key = JSON.stringify([run, group, version]);
  if (!cache.has(key)) {
    cache.set(key, api.diagnosis(run, group).catch(() => null));
    if (cache.size > 20) cache.delete(cache.keys().next().value);
  }
  return cache.get(key);
}

// Text with `code` spans, as the cause table writes its remedies.
function withCode(className, text) {
  const e = el("div", className);
  String(text).split("`").forEach((part, i) => {
    if (part) e.appendChild(i % 2 ? el("code", "nw-code", part) : document.createTextNode(part));
  });
  return e;
}

function siteWords(s) {
  const what = [String(s.kind || "").replace(/_/g, " "), s.tensor].filter((x) => x).join(" ");
  return s.layer ? `${s.layer}, ${what}` : what;
}

export function warningWords(w) {
  const rate = Number(w.growth_per_step);
  return `Early warning at step ${w.step}: ${siteWords(w.site || {})} was on course to pass ` +
    `${(w.site && w.site.dtype) || "its dtype"}'s largest value by step ${w.predicted_step}` +
    (Number.isFinite(rate) ? ` (norm \u00d7${rate.toPrecision(3)} a step).` : ".");
}

function basename(path) {
  return String(path || "").split(/[\\/]/).pop();
}

// `Log at my_layers.py:42 in call`: an op and the line of the user's code that made it.
export function opWords(op) {
  const source = op.source || op;
  if (!source || !source.file) return String(op.type || "?");
  return `${op.type} at ${basename(source.file)}:${source.line} in ${source.function}`;
}

// The remedies a replay applied to the failing step's state and batch, and whether each held
// (tb_nanwatch/failing_step.py remedy_words says the same in the report).
export function remedyWords(replay) {
  const trials = (replay && replay.remedies) || [];
  const words = trials.filter((r) => r.applied).map((r) =>
    `${r.remedy}: ${r.finite_after ? "finite after" : "did not hold"}` +
    (r.cause === null || r.cause === undefined ? " (a usual guess)" : ""));
  const untried = new Map(); // why -> remedies that could not be tried for it
  for (const r of trials) {
    if (r.applied || !r.remedy || !r.why) continue;
    if (!untried.has(r.why)) untried.set(r.why, []);
    if (!untried.get(r.why).includes(r.remedy)) untried.get(r.why).push(r.remedy);
  }
  for (const [why, remedies] of untried) words.push(`${remedies.join(", ")}: not tried (${why})`);
  return words;
}

// The failing step as the run directory keeps it: the replay's verdict and op, the producer's
// ops in the user's code, the repro bundle and how to replay it.
export function failingStepLines(facts) {
  if (!facts) return [];
  const lines = [];
  const replay = facts.replay;
  if (replay && replay.op) lines.push(`Op ${opWords(replay.op)}, ${replay.verdict} on replay.`);
  else if (replay) lines.push(`On replay: ${replay.verdict}.`);
  const tried = remedyWords(replay);
  if (tried.length) lines.push(`Remedies on replay: ${tried.join("; ")}.`);
  const ops = facts.producer_ops || [];
  if (ops.length && !(replay && replay.op)) {
    lines.push(`Its ops in your code: ${ops.slice(0, 4).map(opWords).join(", ")}${ops.length > 4 ? ", …" : ""}.`);
  }
  if (facts.bundle) {
    const dir = String(facts.bundle.path).replace(/[\\/][^\\/]*$/, "");
    lines.push(`Repro bundle of step ${facts.bundle.step} (the batch, and the state before it): ` +
      `${facts.bundle.path}. Replay it: tb-nanwatch replay ${dir}`);
  }
  return lines;
}

function causeItem(d) {
  const li = el("li", "nw-cause");
  li.dataset.cause = d.cause;
  const head = el("div", "nw-cause-head");
  head.appendChild(el("span", "nw-cause-title", d.title || d.cause));
  head.appendChild(el("span", "nw-cause-id", ` ${d.cause}`));
  li.appendChild(head);
  li.appendChild(el("div", "nw-cause-evidence", d.evidence));
  const remedy = withCode("nw-cause-remedy", d.remedy);
  remedy.prepend(el("span", "nw-cause-label", "Remedy: "));
  li.appendChild(remedy);
  return li;
}

// Renders into a box appended to `container` once the route answers; a later call for another
// run replaces it.  `version` changes when the run's data do (a reload), so the answer is fetched again.
export function renderDiagnosis(container, {run, group = null, version = "", blownUp = true} = {}) {
  const box = el("div", "nw-diagnosis");
  box.hidden = true;
  container.appendChild(box);
  fetchDiagnosis(run, group, version).then((answer) => {
    if (!answer || !box.isConnected) return;
    const causes = Array.isArray(answer.diagnosis) ? answer.diagnosis : [];
    if (causes.length) {
      box.appendChild(el("div", "nw-diagnosis-lead", blownUp ? "Why (most likely first):" : "Why to worry (most likely first):"));
      const list = el("ol", "nw-cause-list");
      causes.slice(0, SHOWN).forEach((d) => list.appendChild(causeItem(d)));
      box.appendChild(list);
      if (causes.length > SHOWN) {
        const more = el("button", "nw-link", `\u2026 ${causes.length - SHOWN} more cause${causes.length - SHOWN === 1 ? "" : "s"}`);
        more.type = "button";
        more.addEventListener("click", () => {
          causes.slice(SHOWN).forEach((d) => list.appendChild(causeItem(d)));
          more.remove();
        });
        box.appendChild(more);
      }
    }
    for (const line of failingStepLines(answer.failing_step)) box.appendChild(el("div", "nw-failing-step", line));
    if (answer.early_warning) box.appendChild(el("div", "nw-early-warning", warningWords(answer.early_warning)));
    box.hidden = !box.childNodes.length;
  });
  return box;
}
