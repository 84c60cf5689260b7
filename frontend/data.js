// Data access: fetches the plugin's routes (documented in tb_nanwatch/http_api.md) and
// decodes the heatmap's compact encoding.  No DOM here.

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJSON(route, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, String(v));
  }
  const qs = query.toString();
  // Relative to the iframe's <base href="plugin/nanwatch/">: reaches /data/plugin/nanwatch/<route>.
  const response = await fetch(`./${route}${qs ? "?" + qs : ""}`, {cache: "no-store"});
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${route}: HTTP ${response.status}`;
    throw new HttpError(response.status, message);
  }
  return body;
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// JSON carries +-Infinity as strings ("Infinity", "-Infinity") and NaN as null.
export function toNumber(v) {
  if (v === null || v === undefined) return NaN;
  if (v === "Infinity") return Infinity;
  if (v === "-Infinity") return -Infinity;
  if (v === "NaN") return NaN;
  return Number(v);
}

export function decodeHeatmap(json) {
  const valueBytes = base64Bytes(json.values);
  const statusBytes = base64Bytes(json.status);
  const late = json.late ? base64Bytes(json.late) : null;
  // float32 little-endian, row-major [n_rows, n_columns]; copy to an aligned buffer.
  const values = new Float32Array(json.n_rows * json.n_columns);
  const view = new DataView(valueBytes.buffer);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(i * 4, true);
  return Object.assign({}, json, {values, status: statusBytes, late});
}

export const api = {
  info: () => getJSON("info"),
  runs: () => getJSON("runs"),
  groups: () => getJSON("groups"),
  overview: () => getJSON("overview"),
  firstNonfinite: (run, group) => getJSON("first_nonfinite", {run, group}),
  precursors: (run, group) => getJSON("precursors", {run, group}),
  diagnosis: (run, group) => getJSON("diagnosis", {run, group}),
  heatmap: async (params) => decodeHeatmap(await getJSON("heatmap", params)),
  cell: (params) => getJSON("cell", params),
};
