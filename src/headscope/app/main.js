// Router and URL state. Everything a view shows is derived from the hash
// (#/<view>/<args>?<params>), so reload, back/forward and shared links restore it. Views are
// modules exporting mount(root, ctx) → {update?(ctx) → bool, unmount?()}: when only the params
// change, update() is tried first so views can redraw without re-fetching.

import * as data from './data.js';
import { h, clear, errorBox } from './lib/dom.js';
import { hideTip } from './lib/tooltip.js';
import * as scatter from './views/scatter.js';
import * as headView from './views/head.js';
import * as custom from './views/custom.js';
import * as sweep from './views/sweep.js';
import * as geometry from './views/geometry.js';
import * as features from './views/features.js';
import * as featureView from './views/feature.js';
import * as ablate from './views/ablate.js';
import * as edgeGraph from './views/edge_graph.js';

/** Test and debugging hooks (read by tests/browser). */
const hooks = {
  view: null,
  ready: null,
  readyMs: null,
  markCount: 0,
  lastHoverMs: null,
  live: null,
};
window.__headscope = hooks;

const ROUTES = [
  { name: 'heads', nav: 'heads', match: (p) => p.length === 0 || p[0] === 'heads', key: () => 'heads', view: scatter },
  { name: 'head', nav: 'heads', match: (p) => p[0] === 'head' && p.length >= 2, key: (p) => `head/${p[1]}`, view: headView },
  { name: 'custom', nav: 'custom', match: (p) => p[0] === 'custom', key: () => 'custom', view: custom },
  { name: 'sweep', nav: 'sweep', match: (p) => p[0] === 'sweep', key: () => 'sweep', view: sweep },
  { name: 'geometry', nav: 'geometry', match: (p) => p[0] === 'geometry', key: () => 'geometry', view: geometry },
  { name: 'features', nav: 'features', match: (p) => p[0] === 'features', key: () => 'features', view: features },
  { name: 'feature', nav: 'features', match: (p) => p[0] === 'feature', key: (p) => `feature/${p.slice(1).join('/')}`, view: featureView },
  { name: 'edges', nav: 'edges', match: (p) => p[0] === 'edges', key: () => 'edges', view: edgeGraph },
  { name: 'ablate', nav: 'ablate', match: (p) => p[0] === 'ablate', key: () => 'ablate', view: ablate },
];

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const q = raw.indexOf('?');
  const path = q < 0 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params };
}

/** Build a hash for `parts` and `params` (an object or URLSearchParams); keeps ?run= if set. */
export function hashFor(parts, params = {}) {
  const p = params instanceof URLSearchParams ? new URLSearchParams(params) : new URLSearchParams();
  if (!(params instanceof URLSearchParams)) {
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') p.set(k, String(v));
  }
  const run = parseHash().params.get('run');
  if (run && !p.has('run')) p.set('run', run);
  const qs = p.toString();
  return `#/${parts.map(encodeURIComponent).join('/')}${qs ? `?${qs}` : ''}`;
}

let navStart = performance.now();
let current = null;
let routing = false;

function makeCtx(parts, params, routeName) {
  return {
    parts,
    params,
    route: routeName,
    get: (name, dflt = null) => (params.has(name) ? params.get(name) : dflt),
    /** Navigate to another view (a history entry). */
    go(parts2, params2 = {}) {
      location.hash = hashFor(parts2, params2);
    },
    /** Merge `patch` into the current params; null/'' deletes. `replace` skips history. */
    set(patch, { replace = false } = {}) {
      const { parts: cur, params: p } = parseHash();
      for (const [k, v] of Object.entries(patch)) {
        if (v === null || v === undefined || v === '') p.delete(k);
        else p.set(k, String(v));
      }
      const next = hashFor(cur, p);
      if (next === location.hash) return;
      if (replace) {
        history.replaceState(null, '', next);
        route();
      } else {
        location.hash = next;
      }
    },
    href: (parts2, params2 = {}) => hashFor(parts2, params2),
    /** Views call this once interactive; tests and the perf check read it. */
    ready(name) {
      hooks.ready = name;
      hooks.readyMs = performance.now() - navStart;
    },
    hooks,
  };
}

function setNav(name) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function route() {
  if (routing) return;
  routing = true;
  try {
    hideTip();
    const { parts, params } = parseHash();
    const r = ROUTES.find((x) => x.match(parts));
    const root = document.getElementById('view');
    if (!r) {
      if (current?.instance?.unmount) current.instance.unmount();
      current = null;
      clear(root).append(errorBox(`Unknown page “${location.hash}”.`), h('p', {}, h('a', { href: hashFor(['heads']) }, 'Go to the head selector')));
      return;
    }
    const key = r.key(parts);
    const ctx = makeCtx(parts, params, r.name);
    setNav(r.nav);
    hooks.view = r.name;
    if (current && current.key === key && current.instance.update && current.instance.update(ctx) !== false) return;
    if (current?.instance?.unmount) current.instance.unmount();
    hooks.ready = null;
    clear(root);
    window.scrollTo(0, 0);
    current = { key, instance: r.view.mount(root, ctx) || {} };
  } finally {
    routing = false;
  }
}

async function header() {
  for (const a of document.querySelectorAll('[data-nav]')) a.setAttribute('href', hashFor([a.dataset.nav]));
  const runEl = document.getElementById('run-name');
  const statusEl = document.getElementById('server-status');
  const st = await data.liveStatus();
  if (st.server && st.health && st.health.run === null) {
    // `headscope serve --model M` without a run: the live views work, nothing to load
    runEl.textContent = 'no run served: live views only';
    runEl.classList.add('muted');
  } else try {
    const [m, { name, source }] = await Promise.all([data.manifest(), data.runName()]);
    const model = m.model || {};
    runEl.textContent = '';
    runEl.append(
      h('span', { class: 'run-label', title: `run name, from ${source}` }, name),
      h('span', { class: 'muted' }, ` · ${model.name || 'model'} · ${model.n_layers ?? '?'} layers × ${model.n_heads ?? '?'} heads`),
    );
    if (m.status && m.status !== 'complete') runEl.append(h('span', { class: 'badge warn', title: 'the run did not finish; some heads may be missing' }, m.status));
    document.title = `${name} · headscope`;
  } catch (err) {
    runEl.textContent = `run not found at ${data.RUN_BASE}`;
    runEl.classList.add('error-text');
  }
  hooks.live = st.live;
  statusEl.textContent = '';
  let badge = h('span', { class: 'badge', title: 'no live server: precomputed views only' }, 'static');
  if (st.live) badge = h('span', { class: 'badge live', title: `live server: ${JSON.stringify(st.health)}` }, `live · ${st.health.model}`);
  else if (st.server) badge = h('span', { class: 'badge', title: 'the server has no model: live views are off' }, 'server · no model');
  statusEl.append(badge);
  if (st.live && st.health.dictionary_training) trainingBadge(statusEl, st.health.dictionary_training);
}

/**
 * Residual dictionaries training in the background (`headscope demo`): layers ready of all and
 * the time left, polled from `api/health` until the training ends. The server uses each layer as
 * soon as it is done; a reload shows every ready layer in the app's basis menus.
 */
function trainingBadge(statusEl, first) {
  if (!first.running && first.layers_ready.length === first.layers.length) return;
  const el = h('span', { class: 'badge', title: 'feature dictionaries training in the background; each layer is used as soon as it is done' });
  statusEl.append(' ', el);
  const show = (t) => {
    const left = t.running && t.eta_seconds ? ` · ~${Math.max(1, Math.round(t.eta_seconds / 60))} min left` : '';
    el.textContent = `dictionaries ${t.layers_ready.length}/${t.layers.length}${left}`;
  };
  show(first);
  if (!first.running) return;
  const timer = setInterval(async () => {
    try {
      const resp = await fetch('api/health', { headers: { accept: 'application/json' } });
      const t = (await resp.json()).dictionary_training;
      if (t) show(t);
      if (!t || !t.running) clearInterval(timer);
    } catch { /* the server is gone: keep the last state */ }
  }, 10000);
}

window.addEventListener('hashchange', () => {
  navStart = performance.now();
  route();
});

header();
route();
