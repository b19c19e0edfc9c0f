// The data contract, JS side. Every read of a run file and every live-server call goes through
// this module; views never call fetch(). Shapes are documented in docs/run-format.md (run files)
// and docs/app.md (live API). Responses are normalised here once (token ids decoded to strings,
// metric columns split out) so views only deal with ready-to-draw data.

import { HEAD_RE } from './lib/components.js';

/** Thrown for HTTP errors; `message` is the server's `detail` when it sent one. */
export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

/** Thrown by live calls when no live server is reachable (static hosting). */
export class NeedsServerError extends Error {
  constructor() {
    super('This view needs a live server: run `headscope serve RUN --model M`');
    this.name = 'NeedsServerError';
  }
}

function hashParam(name) {
  const q = location.hash.indexOf('?');
  return q < 0 ? null : new URLSearchParams(location.hash.slice(q + 1)).get(name);
}

function initialRunBase() {
  const raw = hashParam('run') || new URLSearchParams(location.search).get('run') || 'run/';
  return raw.endsWith('/') ? raw : `${raw}/`;
}

/** Relative URL of the run directory: `run/` unless the page URL says `?run=` (or `#…?run=`). */
export const RUN_BASE = initialRunBase();
export const runUrl = (rel) => RUN_BASE + rel;

async function fetchJSON(url, init) {
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (err) {
    throw new ApiError(`Could not reach ${url} (${err.message})`);
  }
  if (!resp.ok) {
    let detail = null;
    try {
      const body = await resp.json();
      detail = typeof body.detail === 'string' ? body.detail : body.detail ? JSON.stringify(body.detail) : null;
    } catch {
      detail = null;
    }
    throw new ApiError(detail || `${url}: HTTP ${resp.status} ${resp.statusText}`, resp.status);
  }
  try {
    return await resp.json();
  } catch {
    throw new ApiError(`${url} is not valid JSON`);
  }
}

const cache = new Map();
/** Memoise a promise; a failed load is forgotten so the next call retries. */
function cached(key, load, cap = 0) {
  if (cache.has(key)) {
    const v = cache.get(key);
    if (cap) { cache.delete(key); cache.set(key, v); }
    return v;
  }
  const p = load().catch((err) => { cache.delete(key); throw err; });
  cache.set(key, p);
  if (cap) {
    const keys = [...cache.keys()].filter((k) => k.startsWith('head:'));
    if (keys.length > cap) cache.delete(keys[0]);
  }
  return p;
}

// ---------------------------------------------------------------- run files (static)

/** manifest.json as written (see docs/run-format.md). */
export const manifest = () => cached('manifest', () => fetchJSON(runUrl('manifest.json')));

/**
 * metrics.json, normalised: {columns, metricNames, docs, levels, names, layer, head, nLayers,
 * nHeads, index: Map(name → row), col(name) → Float64Array (NaN where undefined)}. `layer` and
 * `head` are columns too. levels[col] names the values of an ordinal column ({"1": "monosemantic"}).
 */
export const metrics = () => cached('metrics', async () => {
  const raw = await fetchJSON(runUrl('metrics.json'));
  const { columns, rows } = raw;
  const n = rows.length;
  const colIndex = new Map(columns.map((c, i) => [c, i]));
  const arrays = new Map();
  const col = (name) => {
    if (!arrays.has(name)) {
      const j = colIndex.get(name);
      const a = new Float64Array(n);
      // null: the metric is undefined for that head (a mean over no eligible pair)
      if (j !== undefined) for (let i = 0; i < n; i++) a[i] = rows[i][j] === null ? NaN : Number(rows[i][j]);
      arrays.set(name, a);
    }
    return arrays.get(name);
  };
  const layer = col('layer');
  const head = col('head');
  const names = Array.from({ length: n }, (_, i) => `L${layer[i]}H${head[i]}`);
  return {
    columns,
    metricNames: columns.filter((c) => c !== 'layer' && c !== 'head' && c !== 'name'),
    docs: raw.docs || {},
    levels: raw.levels || {},
    names,
    layer,
    head,
    nLayers: n ? Math.max(...layer) + 1 : 0,
    nHeads: n ? Math.max(...head) + 1 : 0,
    index: new Map(names.map((nm, i) => [nm, i])),
    col,
    has: (name) => colIndex.has(name),
  };
});

/** vocab.json (an object id → string, or an array indexed by id) as a decode function. */
export const vocab = () => cached('vocab', async () => {
  const table = await fetchJSON(runUrl('vocab.json'));
  return (id) => {
    const v = table[id];
    return v === undefined ? `<${id}>` : v;
  };
});

/** heads/L{l}H{h}.json with every example's token ids decoded into `strs`. */
export function head(name) {
  if (!HEAD_RE.test(name)) return Promise.reject(new ApiError(`"${name}" is not a head name (expected L<layer>H<head>)`));
  return cached(`head:${name}`, async () => {
    const [payload, decode] = await Promise.all([
      fetchJSON(runUrl(`heads/${name}.json`)).catch((err) => {
        throw err.status === 404 ? new ApiError(`This run has no data for ${name}.`, 404) : err;
      }),
      vocab(),
    ]);
    for (const ex of payload.examples || []) ex.strs = ex.tokens.map(decode);
    for (const pt of (payload.pca && payload.pca.points) || []) {
      for (const span of pt.context || []) span.strs = span.tokens.map(decode);
    }
    return payload;
  }, 48);
}

/** motifs/map.json: {heads, isomap, tsne, nearest}. */
export const motifMap = () => cached('map', () => fetchJSON(runUrl('motifs/map.json')));

/**
 * motifs/across.json (written by `headscope motifs map RUN_A RUN_B --save`): this run's heads
 * mapped with other models' heads, {runs, this_run, heads, maps, nearest}; null when the
 * manifest names none.
 */
export const motifAcross = () => cached('across', async () => {
  const m = await manifest();
  return m.across ? fetchJSON(runUrl(m.across)) : null;
});

/**
 * Precomputed attribution files, from the manifest's optional `attributions` list (paths
 * relative to `attributions/`, e.g. "L5H3/17_12_11_qk.json"). Listing them in the manifest lets
 * the app know which files exist without probing for 404s.
 */
async function precomputed() {
  const m = await manifest();
  return new Set(Array.isArray(m.attributions) ? m.attributions : []);
}

// ---------------------------------------------------------------- live server

/**
 * {live, health, server, run}. `GET api/health` is answered by `headscope serve`; a static
 * export answers it from the app's own `api/health` file ({"static": true}), so detecting "no
 * server" never produces a failed request in the console. `server` is true when a server
 * answered but has no model loaded (live views cannot run then either); `run` is the name of
 * the run directory the server serves at `run/` (null: none, or no server).
 */
export const liveStatus = () => cached('health', async () => {
  const none = { live: false, health: null, server: false, run: null };
  try {
    const resp = await fetch('api/health', { headers: { accept: 'application/json' } });
    if (!resp.ok) return none;
    const body = await resp.json();
    const server = Boolean(body && !body.static);
    const live = server && Number.isFinite(body.n_layers) && Boolean(body.model);
    return { live, health: live ? body : null, server, run: server && typeof body.run === 'string' ? body.run : null };
  } catch {
    return none;
  }
});

const basename = (p) => String(p).replace(/[\\/]+$/, '').split(/[\\/]/).pop();

/**
 * The run's name and where it comes from ({name, source}), for the header and the page title.
 * In order: a `name` in the manifest (or in its config); the run directory's name, from the
 * live server when it serves the run the app reads (`run/`), or from `?run=`; else the run is
 * named by what the manifest says it was made from (its dataset and size, or the HeadVis tree it
 * was imported from): a static export copies the run to `run/`, which keeps no name.
 */
export async function runName() {
  const m = await manifest();
  const cfg = m.config || {};
  const own = m.name || cfg.name || cfg.run_name;
  if (own) return { name: String(own), source: 'the run manifest' };
  const folder = basename(RUN_BASE);
  if (RUN_BASE === 'run/') {
    const st = await liveStatus();
    if (st.run) return { name: st.run, source: 'the run directory the server serves' };
  } else if (folder && folder !== '.' && folder !== '..') {
    return { name: folder, source: `the run directory ${RUN_BASE}` };
  }
  if (cfg.imported_from) return { name: basename(cfg.imported_from), source: 'the HeadVis tree the run was imported from' };
  const ds = m.dataset || {};
  const from = ds.path || ds.name;
  if (from) {
    const tokens = m.tokens && Number.isFinite(m.tokens.tokens) ? `, ${m.tokens.tokens.toLocaleString('en-US')} tokens` : '';
    return { name: `${basename(from)}${tokens}`, source: 'the manifest names no run: its dataset and size' };
  }
  return { name: folder || 'run', source: 'the run directory' };
}

async function post(path, body) {
  const st = await liveStatus();
  if (!st.live) throw new NeedsServerError();
  return fetchJSON(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify(body),
  });
}

/** The live API (docs/app.md lists request and response shapes). */
export const api = {
  tokenize: (text) => post('api/tokenize', { text }),
  attend: (text, heads = null) => post('api/attend', { text, heads }),
  // a tiny threshold: each query's top keys are listed even where attention is diffuse (long texts)
  attendSummary: (text, head, threshold = 1e-4) => post('api/attend-summary', { text, head, threshold }),
  rankHeads: (text, query, key) => post('api/rank-heads', { text, query, key }),
  attributeQK: (req) => post('api/attribute/qk', req),
  attributeOV: (req) => post('api/attribute/ov', req),
  composition: (req) => post('api/composition', req),
  sweep: (req) => post('api/sweep', req),
  geometry: (req) => post('api/geometry', req),
  virtualWeights: (req) => post('api/virtual-weights', req),
  feature: (req) => post('api/feature', req),
  headLoadings: (req) => post('api/head-loadings', req),
  edgeGraph: (req) => post('api/edge-graph', req),
  ablate: (req) => post('api/ablate', req),
  interventionCurve: (req) => post('api/intervention-curve', req),
  knockout: (req) => post('api/knockout', req),
};

async function send(method, path, body) {
  const st = await liveStatus();
  if (!st.server) throw new NeedsServerError();
  const init = { method, headers: { accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  return fetchJSON(path, init);
}

/**
 * Routes about the served run (server/run_routes.py): a head's description tested on its stored
 * examples (`on: "stored"` needs a server but no model), saved with the run, and its
 * "A if present, otherwise B" pairs (needs the model).
 */
export const runApi = {
  describe: (req) => send('POST', 'api/run/describe', req),
  description: (head) => send('GET', `api/run/descriptions/${encodeURIComponent(head)}`),
  saveDescription: (head, req) => send('PUT', `api/run/descriptions/${encodeURIComponent(head)}`, req),
  priority: (req) => post('api/run/priority', req),
};

/**
 * decompose/index.json (written by `headscope decompose pages RUN`): the run's MTCs, QK
 * dictionaries and head splits with their metrics; null when the manifest names none.
 */
export const decomposeIndex = () => cached('decompose', async () => {
  const m = await manifest();
  return m.decompose ? fetchJSON(runUrl(m.decompose)) : null;
});

/** A decomposition's pages.json (`rel` relative to decompose/), context token ids decoded. */
export const decomposePages = (rel) => cached(`dec:${rel}`, async () => {
  const [pages, decode] = await Promise.all([fetchJSON(runUrl(`decompose/${rel}`)), vocab()]);
  for (const c of pages.contexts || []) c.strs = c.tokens.map(decode);
  return pages;
});

/** A run example's text for the live API, and the map run position -> server position. */
export const alignRunExample = (sequence, strs) => cached(`align:${sequence}`, () => alignExample(strs));

const SPECIAL = /^<\|?[^<>]*\|?>$/;

/**
 * Map run-example positions onto the server's tokenisation of the example's text. The live API
 * takes text, so the text is rebuilt from the decoded tokens (a leading special token is left
 * to the server's tokenizer) and re-tokenised; positions map 1:1 while the strings agree. From
 * the first disagreement on (typically the last tokens: a sequence cut inside "\n    " ends in
 * text that re-tokenises as one longer token) positions map to null: attention is causal, so
 * a pair before it is attributed exactly as in the run.
 */
async function alignExample(strs) {
  const body = SPECIAL.test(strs[0] || '') ? strs.slice(1) : strs;
  const text = body.join('');
  const { tokens } = await api.tokenize(text);
  const map = new Array(strs.length).fill(null);
  let j = 0;
  for (let i = 0; i < strs.length; i++) {
    while (j < tokens.length && tokens[j] !== strs[i] && SPECIAL.test(tokens[j])) j++;
    if (j < tokens.length && tokens[j] === strs[i]) { map[i] = j; j++; }
    else if (!SPECIAL.test(strs[i])) break;
  }
  return { text, map };
}

/**
 * QK or OV attribution for (head, query, key) on a run example: the precomputed file when the
 * run lists one (and, with a live server, it is in the requested basis), else the live server,
 * else {source: "none"}. `basis` null means "whatever is precomputed, else components".
 * @returns {Promise<{source: "precomputed"|"live"|"none", result?: object}>}
 */
export async function exampleAttribution(kind, { head: name, sequence, query, key, strs, basis = null }) {
  const rel = `${name}/${sequence}_${query}_${key}_${kind}.json`;
  const { live } = await liveStatus();
  if ((await precomputed()).has(rel)) {
    const result = await cached(`attr:${rel}`, () => fetchJSON(runUrl(`attributions/${rel}`)));
    if (!live || !basis || !result.basis || basisKind(result.basis) === basisKind(basis)) return { source: 'precomputed', result };
  }
  if (!live) return { source: 'none' };
  const { text, map } = await cached(`align:${sequence}`, () => alignExample(strs));
  if (!map || map[query] === null || map[key] === null) {
    throw new ApiError('The live server tokenises this example differently from the run, so positions would not match; paste its text into Custom text instead.');
  }
  const req = { text, head: name, query: map[query], key: map[key], basis: basis || 'components' };
  return { source: 'live', result: await attribute(kind, req) };
}

/**
 * The live server's text and positions for a run example's (query, key): what a live request
 * about that pair sends (null positions when the server tokenises the example differently).
 */
export async function exampleLiveText(sequence, strs, query, key) {
  const { text, map } = await cached(`align:${sequence}`, () => alignExample(strs));
  return { text, query: map ? map[query] : null, key: map ? map[key] : null };
}

/** Attribution for free text (custom view): always live. */
export async function textAttribution(kind, req) {
  return { source: 'live', result: await attribute(kind, req) };
}

// ---------------------------------------------------------------- the feature basis

/** "sae" or "components": the basis a request names, or a result's `basis` ("sae:<folder>"). */
export const basisKind = (b) => (String(b || '').startsWith('sae') ? 'sae' : 'components');

/** A feature-basis request the server refused because it has no dictionary for the layer. */
export class NoDictionaryError extends ApiError {
  constructor(message, status) {
    super(message, status);
    this.name = 'NoDictionaryError';
  }
}

let learnedLayers = null;

/**
 * The layers the live server has a residual dictionary for (the `sae` basis; a layer's
 * dictionary decomposes the residual entering it), [] without a live server. From `api/health`
 * `dictionary_layers` when the server reports it; a server that does not is learned from its
 * answer to the first feature-basis request it refuses ("no residual dictionary for layer L;
 * have layers [..]", or "no dictionaries loaded"), and null (unknown) until then.
 */
export async function dictionaryLayers() {
  const st = await liveStatus();
  if (!st.live) return [];
  if (Array.isArray(st.health.dictionary_layers)) return st.health.dictionary_layers;
  if ('dictionary_layers' in st.health) return []; // null: no dictionaries loaded
  return learnedLayers;
}

function learnDictionaries(err) {
  const msg = String((err && err.message) || '');
  const m = msg.match(/no residual dictionary for layer \d+; have layers \[([\d,\s]*)\]/);
  if (m) learnedLayers = m[1].split(',').map((x) => x.trim()).filter(Boolean).map(Number);
  else if (/no dictionaries loaded/.test(msg)) learnedLayers = [];
  else return err;
  return new NoDictionaryError(msg, err.status);
}

/**
 * Can the feature basis attribute a head of `layer`? {ok: true | false | null (unknown), why}
 * (`why` reads after "SAE features: ").
 * QK and OV attributions decompose the residual entering the head's layer (at the query and at
 * the key), so they need that layer's dictionary.
 */
export async function featureBasis(layer) {
  if (!(await liveStatus()).live) return { ok: false, why: 'they need a live server' };
  const layers = await dictionaryLayers();
  if (layers === null) return { ok: null, why: `they need a residual dictionary for layer ${layer} on the server` };
  if (!layers.length) {
    return { ok: false, why: 'the server has no residual dictionaries (serve with --dictionaries DIR, or put SAEs in RUN/dictionaries/)' };
  }
  if (!layers.includes(layer)) {
    return { ok: false, why: `the server has no residual dictionary for layer ${layer} (it has layer${layers.length > 1 ? 's' : ''} ${layers.join(', ')})` };
  }
  return { ok: true, why: `the server has a residual dictionary for layer ${layer}` };
}

async function attribute(kind, req) {
  try {
    return await (kind === 'qk' ? api.attributeQK(req) : api.attributeOV(req));
  } catch (err) {
    throw basisKind(req.basis) === 'sae' ? learnDictionaries(err) : err;
  }
}
