// QK geometry (#/geometry, live server): cosine similarity between the chosen heads' query
// vectors and key vectors, side by side with the same matrix in the residual stream (the HeadVis
// paper's country/city matrix). One heatmap per matrix, diverging scale on [-1, 1]. Each prompt marks the token
// whose vector is used as [[token]]; a line without a mark uses its last word. URL params:
// queries, keys, heads.

import * as data from '../data.js';
import { h, clear, errorBox, loading, needsServer, parseHead } from '../lib/dom.js';
import { diverging } from '../lib/color.js';
import { heatmap, colorLegend, s, svgRoot } from '../lib/svg.js';
import { exportButtons } from '../lib/export.js';

const DEFAULTS = {
  queries: 'The country [[France]]\nThe country [[Japan]]\nThe country [[Brazil]]',
  keys: 'The city [[Paris]] is well known\nThe city [[Lyon]] is well known\nThe city [[Tokyo]] is well known\nThe city [[Osaka]] is well known\nThe city [[Rio]] is well known',
  heads: 'L0H0',
};

/**
 * Shorten labels that share leading and trailing words ("The city Paris is well known" …) to the
 * words that differ; returns {labels, template} where template shows the shared part as "…".
 */
export function shortLabels(labels) {
  const words = labels.map((l) => String(l).split(/\s+/).filter(Boolean));
  if (labels.length < 2 || words.some((w) => w.length < 2)) return { labels: labels.map(String), template: '' };
  let pre = 0;
  while (words.every((w) => w.length > pre + 1 && w[pre] === words[0][pre])) pre++;
  let suf = 0;
  while (words.every((w) => w.length > pre + suf + 1 && w[w.length - 1 - suf] === words[0][words[0].length - 1 - suf])) suf++;
  if (!pre && !suf) return { labels: labels.map(String), template: '' };
  const short = words.map((w) => w.slice(pre, w.length - suf).join(' '));
  const template = [...words[0].slice(0, pre), '…', ...words[0].slice(words[0].length - suf)].join(' ');
  return { labels: short, template };
}

/** One prompt per line, its token marked as [[token]] (default: the last word). */
export function parseItems(text) {
  return String(text).split('\n').map((x) => x.trim()).filter(Boolean)
    .map((line) => (line.includes('[[') ? line : line.replace(/(\S+)$/, '[[$1]]')));
}

export function mount(root, ctx) {
  let alive = true;
  const container = h('div', { class: 'view view-geometry' }, h('h1', {}, 'QK geometry'), loading('Checking for a live server…'));
  root.append(container);
  let inst = null;
  data.liveStatus().then((st) => {
    if (!alive) return;
    if (!st.live) {
      clear(container).append(h('h1', {}, 'QK geometry'), needsServer('QK geometry', st.server));
      ctx.ready('geometry');
      return;
    }
    inst = build(container, ctx);
    inst.update(ctx);
    ctx.ready('geometry');
  });
  return {
    update(c) { ctx = c; if (!inst) return false; inst.update(c); return true; },
    unmount() { alive = false; },
  };
}

function build(container, ctx0) {
  let ctx = ctx0;
  const queries = h('textarea', { id: 'geo-queries', rows: 5, spellcheck: 'false' });
  const keys = h('textarea', { id: 'geo-keys', rows: 5, spellcheck: 'false' });
  const heads = h('input', { id: 'geo-heads', type: 'text', spellcheck: 'false' });
  const msg = h('span', { class: 'error-text small', 'aria-live': 'polite' });
  const result = h('div', {});
  let lastKey = null;
  const form = h('form', { class: 'panel', onsubmit: (ev) => {
    ev.preventDefault();
    const names = heads.value.split(/[\s,]+/).filter(Boolean).map((x) => parseHead(x));
    if (!names.length || names.some((x) => !x)) { msg.textContent = 'heads: a comma-separated list like L5H3, L6H1'; return; }
    if (!parseItems(queries.value).length || !parseItems(keys.value).length) { msg.textContent = 'give at least one query and one key'; return; }
    msg.textContent = '';
    ctx.set({ queries: queries.value, keys: keys.value, heads: names.map((x) => x.name).join(',') });
  } },
  h('div', { class: 'two-col' },
    h('div', { class: 'field' }, h('label', { for: 'geo-queries' }, 'Queries (one per line; mark the token as [[token]], default the last word)'), queries),
    h('div', { class: 'field' }, h('label', { for: 'geo-keys' }, 'Keys (same format)'), keys)),
  h('div', { class: 'form-row' }, h('label', {}, 'Heads ', heads), h('button', { type: 'submit', class: 'primary' }, 'Compute'), msg));
  container.replaceChildren(h('h1', {}, 'QK geometry'),
    h('p', { class: 'muted' }, 'Cosine similarity between each head’s query vectors and key vectors, next to the same texts’ residual-stream vectors. A head can flip or create structure the residual stream does not have.'),
    form, result);

  async function run(c) {
    clear(result).append(loading('Computing…'));
    try {
      const qs = parseItems(c.get('queries'));
      const ks = parseItems(c.get('keys'));
      const headList = c.get('heads').split(',').filter(Boolean);
      const res = await data.api.geometry({ queries: qs, keys: ks, heads: headList });
      const unmark = (l) => String(l).replace(/\[\[|\]\]/g, '');
      const rows = shortLabels((res.query_labels || qs).map(unmark));
      const cols = shortLabels((res.key_labels || ks).map(unmark));
      const rowLabels = rows.labels;
      const colLabels = cols.labels;
      const maxLen = Math.max(...rowLabels.map((x) => x.length), ...colLabels.map((x) => x.length));
      const labelPx = Math.min(200, Math.max(70, maxLen * 6.5));
      const cell = Math.max(16, Math.min(40, Math.floor(420 / Math.max(rowLabels.length, colLabels.length))));
      const title = (name, v) => {
        const means = Number.isFinite(v.diag_mean) ? ` · diagonal ${v.diag_mean.toFixed(2)} · off ${Number(v.offdiag_mean).toFixed(2)}` : '';
        return `${name}${means}`;
      };
      const mats = [...Object.entries(res.heads || {}), ['residual stream', res.residual]]
        .filter(([, v]) => v && v.cosine)
        .map(([name, v]) => [title(name, v), v.cosine]);
      const fig = (title, m) => heatmap({ matrix: m, rowLabels, colLabels, scale: diverging, title, cell, labelPx, format: (v) => Number(v).toFixed(3) });
      const legend = () => colorLegend({ scale: diverging, lo: -1, hi: 1, label: 'cosine similarity (query rows × key columns)', width: 280 });
      const all = () => {
        const figs = mats.map(([t, m]) => fig(t, m));
        let x = 0;
        const W = figs.reduce((a, f) => a + Number(f.getAttribute('width')) + 10, 0);
        const H = Math.max(...figs.map((f) => Number(f.getAttribute('height')))) + 56;
        const g = figs.map((f) => { const w = s('g', { transform: `translate(${x} 0)` }, ...f.childNodes); x += Number(f.getAttribute('width')) + 10; return w; });
        const lg = legend();
        return svgRoot(Math.max(W, 300), H, g, s('g', { transform: `translate(0 ${H - 50})` }, ...lg.childNodes));
      };
      const templates = [rows.template && `rows: “${rows.template}”`, cols.template && `columns: “${cols.template}”`].filter(Boolean).join(' · ');
      clear(result).append(h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', {}, 'Cosine similarity'), legend(), templates ? h('span', { class: 'muted small' }, templates) : null, h('span', { class: 'grow' }), exportButtons('qk_geometry', { svg: all })),
        h('div', { class: 'heatmaps', id: 'geo-heatmaps' }, mats.map(([t, m]) => h('div', { class: 'figure-scroll' }, fig(t, m))))));
      ctx.hooks.heatmaps = mats.length;
    } catch (err) {
      clear(result).append(errorBox(err));
    }
  }

  return {
    update(c) {
      ctx = c;
      queries.value = c.get('queries', queries.value || DEFAULTS.queries);
      keys.value = c.get('keys', keys.value || DEFAULTS.keys);
      heads.value = c.get('heads', heads.value || DEFAULTS.heads);
      const key = ['queries', 'keys', 'heads'].map((n) => c.get(n)).join('\u0000');
      if (c.get('queries') && c.get('keys') && c.get('heads') && key !== lastKey) {
        lastKey = key;
        run(c);
      }
    },
  };
}
