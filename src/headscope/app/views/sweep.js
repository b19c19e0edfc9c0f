// Sweep (#/sweep, live server): fill a template's {} with each value and plot the chosen heads'
// attention from the query to the key as a function of the value (line chart for numbers, bar
// chart otherwise) — the HeadVis paper's year sweep. Positions are an index, 'last', or 'slot:i' (the i-th
// token of the value; the default query is slot:-1, the key slot:0). URL params: tpl, vals,
// heads, q, k.

import * as data from '../data.js';
import { h, clear, errorBox, loading, needsServer, parseHead, fixed } from '../lib/dom.js';
import { categorical } from '../lib/color.js';
import { lineChart, barChart } from '../lib/svg.js';
import { labelToken } from '../lib/tokens.js';
import { exportButtons } from '../lib/export.js';

const DEFAULTS = { tpl: 'The war lasted from {} to 1800.', vals: '1000:2001:25', q: 'slot:-1', k: 'slot:0' };
const POSITION_RE = /^(last|slot:-?\d{1,9}|-?\d{1,12})$/;

/** A position field as the API takes it: an integer, or 'last' / 'slot:i' as a string. */
const position = (v) => (/^-?\d+$/.test(v) ? Number.parseInt(v, 10) : v);

const RANGE_RE = /^\s*(-?\d+)\s*:\s*(-?\d+)\s*(?::\s*(-?\d+)\s*)?$/;

/** The values field as the API takes it: an integer range "START:STOP" / "START:STOP:STEP"
 *  (stop excluded; the server parses it, the one range syntax of headscope), or a list of
 *  values separated by commas or newlines. */
export function parseValues(text) {
  const t = String(text).trim();
  if (RANGE_RE.test(t)) return t;
  return t.split(/[\n,]+/).map((x) => x.trim()).filter(Boolean);
}

/** The first value the field stands for (for the token preview). */
const firstValue = (values) => (typeof values === 'string' ? values.match(RANGE_RE)[1] : values[0]);

export function mount(root, ctx) {
  let alive = true;
  const container = h('div', { class: 'view view-sweep' }, h('h1', {}, 'Sweep'), loading('Checking for a live server…'));
  root.append(container);
  let inst = null;
  data.liveStatus().then((st) => {
    if (!alive) return;
    if (!st.live) {
      clear(container).append(h('h1', {}, 'Sweep'), needsServer('The sweep', st.server));
      ctx.ready('sweep');
      return;
    }
    inst = build(container, ctx, st.health);
    inst.update(ctx);
    ctx.ready('sweep');
  });
  return {
    update(c) { ctx = c; if (!inst) return false; inst.update(c); return true; },
    unmount() { alive = false; },
  };
}

function build(container, ctx0, health) {
  let ctx = ctx0;
  const field = (id, lab, el, hint) => h('div', { class: 'field' }, h('label', { for: id }, lab), el, hint ? h('div', { class: 'muted small' }, hint) : null);
  const tpl = h('input', { id: 'sweep-template', type: 'text', spellcheck: 'false' });
  const vals = h('textarea', { id: 'sweep-values', rows: 2, spellcheck: 'false' });
  const heads = h('input', { id: 'sweep-heads', type: 'text', spellcheck: 'false' });
  const q = h('input', { id: 'sweep-query', type: 'text', size: 8, spellcheck: 'false' });
  const k = h('input', { id: 'sweep-key', type: 'text', size: 8, spellcheck: 'false' });
  const msg = h('span', { class: 'error-text small', 'aria-live': 'polite' });
  const preview = h('div', { class: 'token-preview' });
  const why = h('p', { class: 'muted small', id: 'sweep-why' });
  const result = h('div', {});
  let lastKey = null;

  /** The heads that attend most from the query to the key on the first value: every head of
   *  the model is ranked with one sweep over that one value, so the suggestion fits the model's
   *  tokenizer (a year is one token in some models and four digits in others). */
  async function findHeads(n = 3) {
    const all = [];
    for (let l = 0; l < health.n_layers; l++) for (let i = 0; i < health.n_heads; i++) all.push(`L${l}H${i}`);
    const first = firstValue(parseValues(vals.value));
    why.textContent = `Ranking all ${all.length} heads on “${tpl.value.replace('{}', first ?? '')}”…`;
    const res = await data.api.sweep({ template: tpl.value, values: [String(first)], heads: all,
      query: position(q.value.trim()), key: position(k.value.trim()) });
    const ranked = Object.entries(res.attention).map(([hn, ys]) => [hn, ys[0]]).sort((a, b) => b[1] - a[1]).slice(0, n);
    const p0 = res.positions[0];
    why.textContent = `${ranked.map(([hn, a]) => `${hn} (${fixed(a, 2)})`).join(', ')}: the heads that attend most from `
      + `“${labelToken(p0.query_token)}” (${q.value.trim()}) to “${labelToken(p0.key_token)}” (${k.value.trim()}) on the first value, `
      + `found by ranking every head; edit the list to compare others.`;
    return ranked.map(([hn]) => hn);
  }

  async function suggest() {
    try {
      const names = await findHeads();
      ctx.set({ tpl: tpl.value, vals: vals.value, heads: names.join(','), q: q.value.trim(), k: k.value.trim() });
    } catch (err) {
      clear(result).append(errorBox(err));
    }
  }

  async function showTokens() {
    const text = tpl.value.replace('{}', firstValue(parseValues(vals.value)) ?? '');
    clear(preview).append(loading('Tokenising…'));
    try {
      const { tokens } = await data.api.tokenize(text);
      clear(preview).append(h('div', { class: 'muted small' }, `Tokens of “${text}” — click one to use it as the key:`),
        h('div', { class: 'chips' }, tokens.map((t, i) => h('button', { type: 'button', class: `chip-btn${String(i) === k.value ? ' on' : ''}`, onclick: () => { k.value = String(i); showTokens(); } },
          h('span', { class: 'muted' }, `${i} `), labelToken(t)))));
    } catch (err) {
      clear(preview).append(errorBox(err));
    }
  }

  const form = h('form', { class: 'panel form-grid', onsubmit: (ev) => {
    ev.preventDefault();
    const names = heads.value.split(/[\s,]+/).filter(Boolean).map((x) => parseHead(x));
    if (!names.length || names.some((x) => !x)) { msg.textContent = 'heads: a comma-separated list like L0H1, L5H3'; return; }
    if (!tpl.value.includes('{}')) { msg.textContent = 'the template needs a {} where each value goes'; return; }
    if (!POSITION_RE.test(q.value.trim()) || !POSITION_RE.test(k.value.trim())) { msg.textContent = 'positions: an index, “last”, or “slot:i” (the i-th token of the value)'; return; }
    msg.textContent = '';
    ctx.set({ tpl: tpl.value, vals: vals.value, heads: names.map((x) => x.name).join(','), q: q.value.trim(), k: k.value.trim() });
  } },
  field('sweep-template', 'Template ({} is replaced by each value)', tpl),
  field('sweep-values', 'Values', vals, 'comma or newline separated, or an integer range START:STOP[:STEP] (stop excluded), e.g. 1000:2001:25'),
  h('div', { class: 'form-row' },
    field('sweep-heads', 'Heads', heads),
    field('sweep-query', 'Query position', q, 'index, “last” or “slot:i”'),
    field('sweep-key', 'Key position', k, '“slot:0” = first token of the value'),
    h('button', { type: 'button', onclick: showTokens }, 'Show tokens'),
    h('button', { type: 'button', onclick: suggest, title: 'rank every head on the first value and sweep the top 3' }, 'Find heads'),
    h('button', { type: 'submit', class: 'primary' }, 'Run sweep'), msg),
  why, preview);
  container.replaceChildren(h('h1', {}, 'Sweep'), h('p', { class: 'muted' }, `Attention from the query to the key as one slot of a template varies (model: ${health.model}).`), form, result);

  async function run(c) {
    const req = {
      template: c.get('tpl'),
      values: parseValues(c.get('vals')),
      heads: c.get('heads').split(',').filter(Boolean),
      query: position(c.get('q', DEFAULTS.q)),
      key: position(c.get('k', DEFAULTS.k)),
    };
    clear(result).append(loading(`Running ${req.values.length} × ${req.heads.length}…`));
    try {
      const res = await data.api.sweep(req);
      const values = res.values || req.values;
      const numeric = values.every((v) => /^\s*-?\d+(\.\d+)?\s*$/.test(String(v)));
      const series = Object.entries(res.attention || {}).map(([hn, ys], i) => ({ name: hn, values: ys, color: categorical(i) }));
      const width = Math.max(600, Math.min(1100, container.clientWidth - 40));
      // Fixed 0–1 axis unless all weights are small, where it would flatten every curve to 0.
      const top = Math.max(...series.flatMap((sr) => sr.values).filter(Number.isFinite), 0);
      const yDomain = [0, top >= 0.5 ? 1 : Math.max(0.01, top * 1.15)];
      const chart = () => (numeric
        ? lineChart({ series: series.map((sr) => ({ name: sr.name, x: values.map(Number), y: sr.values, color: sr.color })), width, height: 360, xLabel: 'value', yLabel: 'attention', yDomain, xFormat: (v) => String(v) })
        : barChart({ categories: values.map(String), series, width, height: 360, yLabel: 'attention', yDomain }));
      // The server reports where query and key fell for each value; older servers send tokens.
      const pos = res.positions || values.map(() => null);
      const toks = res.tokens || [];
      const p0 = pos[0];
      const where = (spec, i, tok) => `${spec}${i !== undefined ? ` (position ${i}` : ''}${tok !== undefined ? ` “${labelToken(tok)}”` : ''}${i !== undefined ? ')' : ''}`;
      const heading = p0
        ? `Attention from ${where(req.query, p0.query, p0.query_token)} to ${where(req.key, p0.key, p0.key_token)}, first value`
        : `Attention from ${req.query} to ${where(req.key, undefined, typeof req.key === 'number' ? toks[req.key] : undefined)}`;
      clear(result).append(h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', {}, heading),
          h('span', { class: 'grow' }), exportButtons('sweep', { svg: chart })),
        h('div', { class: 'figure-scroll', id: 'sweep-chart' }, chart()),
        h('details', {}, h('summary', {}, 'Values'), h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact' },
          h('thead', {}, h('tr', {}, h('th', {}, 'value'), pos[0] ? h('th', {}, 'query → key') : null, series.map((sr) => h('th', { class: 'num' }, sr.name)))),
          h('tbody', {}, values.map((v, i) => h('tr', {}, h('td', {}, String(v)),
            pos[i] ? h('td', { class: 'tokcell' }, `${pos[i].query} “${labelToken(pos[i].query_token)}” → ${pos[i].key} “${labelToken(pos[i].key_token)}”`) : null,
            series.map((sr) => h('td', { class: 'num' }, fixed(sr.values[i], 4)))))))))));
      ctx.hooks.sweepPoints = values.length;
    } catch (err) {
      clear(result).append(errorBox(err));
    }
  }

  return {
    update(c) {
      ctx = c;
      tpl.value = c.get('tpl', tpl.value || DEFAULTS.tpl);
      vals.value = c.get('vals', vals.value || DEFAULTS.vals);
      heads.value = c.get('heads', heads.value || '');
      q.value = c.get('q', q.value || DEFAULTS.q);
      k.value = c.get('k', k.value || DEFAULTS.k);
      const key = ['tpl', 'vals', 'heads', 'q', 'k'].map((n) => c.get(n)).join('\u0000');
      if (c.get('tpl') && c.get('vals') && c.get('heads') && key !== lastKey) {
        lastKey = key;
        run(c);
      } else if (!c.get('heads') && !heads.value && lastKey === null) {
        lastKey = '';
        suggest();  // no heads asked for: start from the ones that fit this model
      }
    },
  };
}
