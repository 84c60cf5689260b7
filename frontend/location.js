// Where the tab lives in TensorBoard: the view in the page's URL, and the theme.
//
// TensorBoard keeps its state in the top page's hash as `#<plugin>&key=value&...` and
// keeps keys it does not know when it rewrites the hash (its `tf_storage` encoding), so
// the run, statistic, kind, steps source and zoom go there as `nw_*` keys: a reload or a
// shared link opens the same view.  The plugin iframe is same-origin, so it reads and
// writes the parent's URL with history.replaceState (no new history entry, no reload).

const KEYS = ["nw_run", "nw_group", "nw_stat", "nw_kind", "nw_source", "nw_steps"];

// The window whose URL holds the view: TensorBoard's page, or this one when opened alone.
function host() {
  try {
    if (window.parent !== window && window.parent.location.href) return window.parent;
  } catch {
    // another origin: keep the view in our own URL
  }
  return window;
}

// "#nanwatch&nw_run=a%2Fb&x=1" -> [["", "nanwatch"], ["nw_run", "a/b"], ["x", "1"]]
export function parseHash(hash) {
  const out = [];
  for (const part of String(hash || "").replace(/^#/, "").split("&")) {
    if (!part) continue;
    const i = part.indexOf("=");
    if (i < 0) out.push(["", decodeURIComponent(part)]);
    else out.push([decodeURIComponent(part.slice(0, i)), decodeURIComponent(part.slice(i + 1))]);
  }
  return out;
}

export function formatHash(pairs) {
  const text = pairs.map(([k, v]) => (k === "" ? encodeURIComponent(v) : `${encodeURIComponent(k)}=${encodeURIComponent(v)}`));
  return text.length ? `#${text.join("&")}` : "";
}

// {run, group, stat, kind, source, range: {first, last} | null} from the URL (missing: undefined).
export function readView() {
  const pairs = new Map(parseHash(host().location.hash));
  const view = {run: pairs.get("nw_run"), group: pairs.get("nw_group"), stat: pairs.get("nw_stat"),
    kind: pairs.get("nw_kind"), source: pairs.get("nw_source"), range: null};
  const m = /^(\d+)-(\d+)$/.exec(pairs.get("nw_steps") || "");
  if (m) view.range = {first: Number(m[1]), last: Number(m[2])};
  return view;
}

// Writes the view into the URL, keeping every other key (TensorBoard's own) as it was.
export function writeView(view) {
  const w = host();
  const pairs = parseHash(w.location.hash).filter(([k]) => !KEYS.includes(k));
  const add = (k, v) => {
    if (v !== undefined && v !== null && v !== "") pairs.push([k, String(v)]);
  };
  add("nw_run", view.run);
  add("nw_group", view.group);
  add("nw_stat", view.stat);
  add("nw_kind", view.kind === "all" ? null : view.kind);
  add("nw_source", view.source === "rows" ? null : view.source);
  add("nw_steps", view.range ? `${view.range.first}-${view.range.last}` : null);
  const hash = formatHash(pairs);
  if (hash === w.location.hash) return;
  try {
    const url = new URL(w.location.href);
    url.hash = hash;
    w.history.replaceState(w.history.state, "", url.toString());
  } catch {
    // a host that refuses: the view just stays out of the URL
  }
}

// TensorBoard's dark mode: it toggles `dark-mode` on its page's body (the theme button,
// or the browser's preference under "browser default").  Alone, the browser's preference.
export function watchDarkMode(onChange) {
  const w = host();
  if (w !== window) {
    const body = w.document.body;
    const read = () => body.classList.contains("dark-mode");
    new MutationObserver(() => onChange(read())).observe(body, {attributes: true, attributeFilter: ["class"]});
    onChange(read());
    return;
  }
  const query = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  if (query && query.addEventListener) query.addEventListener("change", () => onChange(query.matches));
  onChange(Boolean(query && query.matches));
}
