// Ablate (#/ablate, live server): zero-, mean- or resample-ablate every head (batched on the
// server) on a text or on repeated random tokens, and show the rise in next-token loss per head
// as a layer × head grid and a ranked table linking to head pages ("We Inspected Every Head in
// GPT-2 Small Using SAEs"). `headscope ablate RUN --add-column` stores the same numbers as a
// metrics column, which the head selector's scatter plots. URL params: task, text, method.

import * as data from '../data.js';
import { h, clear, errorBox, loading, needsServer, fixed } from '../lib/dom.js';
import { diverging } from '../lib/color.js';
import { heatmap, colorLegend } from '../lib/svg.js';
import { exportButtons } from '../lib/export.js';

const DEFAULTS = { task: 'repeated', method: 'zero', text: 'The cat sat on the mat. The cat sat on the mat.' };

export function mount(root, ctx) {
  let alive = true;
  const container = h('div', { class: 'view view-ablate' }, h('h1', {}, 'Ablate heads'), loading('Checking for a live server…'));
  root.append(container);
  data.liveStatus().then((st) => {
    if (!alive) return;
    if (!st.live) {
      clear(container).append(h('h1', {}, 'Ablate heads'), needsServer('Ablation', st.server));
    } else {
      build(container, ctx);
    }
    ctx.ready('ablate');
  });
  return { unmount() { alive = false; } };
}

function build(container, ctx) {
  const p = (k) => ctx.params.get(k) || DEFAULTS[k];
  const task = h('select', { id: 'ablate-task' },
    h('option', { value: 'repeated', selected: p('task') === 'repeated' }, 'repeated random tokens (induction)'),
    h('option', { value: 'text', selected: p('task') === 'text' }, 'this text'));
  const method = h('select', { id: 'ablate-method' }, ['zero', 'mean', 'resample'].map((m) => h('option', { value: m, selected: p('method') === m }, m)));
  const text = h('textarea', { id: 'ablate-text', rows: 2, spellcheck: 'false' });
  text.value = p('text');
  const button = h('button', { type: 'submit' }, 'Ablate every head');
  const out = h('div', { class: 'ablate-out' });
  const form = h('form', { class: 'controls' },
    h('div', { class: 'field' }, h('label', { for: 'ablate-task' }, 'score on'), task),
    h('div', { class: 'field' }, h('label', { for: 'ablate-method' }, 'method'), method),
    h('div', { class: 'field wide' }, h('label', { for: 'ablate-text' }, 'text (task "this text")'), text),
    button);
  clear(container).append(
    h('h1', {}, 'Ablate heads'),
    h('p', { class: 'muted' }, 'Each head is removed in turn (its output replaced) and the mean next-token loss is measured again; ',
      'the grid shows the rise. On repeated random tokens the loss is scored on the repeat, where induction heads predict. ',
      'Store it with a run: ', h('code', {}, 'headscope ablate RUN --add-column'), '.'),
    form, out);
  const run = async () => {
    const req = { task: task.value, method: method.value };
    if (task.value === 'text') req.text = text.value;
    clear(out).append(loading('Ablating every head…'));
    button.disabled = true;
    try {
      const r = await data.api.ablate(req);
      clear(out).append(render(r));
    } catch (err) {
      clear(out).append(errorBox(err));
    } finally {
      button.disabled = false;
    }
  };
  form.addEventListener('submit', (ev) => { ev.preventDefault(); run(); });
  run();
}

function render(r) {
  const nLayers = Math.max(...r.heads.map((a) => Number(a.head.match(/^L(\d+)/)[1]))) + 1;
  const nHeads = Math.max(...r.heads.map((a) => Number(a.head.match(/H(\d+)$/)[1]))) + 1;
  const grid = Array.from({ length: nLayers }, () => new Array(nHeads).fill(0));
  for (const a of r.heads) {
    const [, l, hh] = a.head.match(/^L(\d+)H(\d+)$/).map(Number);
    grid[l][hh] = a.delta ?? 0;
  }
  const hi = Math.max(1e-6, ...r.heads.map((a) => Math.abs(a.delta ?? 0)));
  const scale = (v) => diverging(Math.max(-1, Math.min(1, v / hi))); // red: loss rises
  const map = () => heatmap({
    matrix: grid, rowLabels: grid.map((_, l) => `layer ${l}`), colLabels: grid[0].map((_, j) => `head ${j}`),
    scale, cell: Math.max(8, Math.min(26, Math.floor(620 / nHeads))), labelPx: 60, showValues: hi >= 0.05, title: `Δ loss when the head is ${r.method}-ablated`,
  });
  const ranked = [...r.heads].sort((a, b) => (b.delta ?? 0) - (a.delta ?? 0)).slice(0, 15);
  return h('div', { class: 'ablate-result' },
    h('p', {}, `${r.method} ablation over ${r.n_sequences} sequence(s) × ${r.seq_len} tokens, ${r.n_predictions} predictions; clean loss `, h('strong', {}, fixed(r.clean_loss))),
    h('div', { class: 'ablate-grid' }, map(), colorLegend({ scale, lo: -hi, hi, label: 'Δ loss (red: the model needs the head)' }), exportButtons('ablation', { svg: map })),
    h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', {}, 'head'), h('th', { class: 'num' }, 'loss'), h('th', { class: 'num' }, 'Δ loss'))),
      h('tbody', {}, ranked.map((a) => h('tr', {},
        h('td', {}, h('a', { href: `#/head/${a.head}` }, a.head)), h('td', { class: 'num' }, fixed(a.loss)), h('td', { class: 'num' }, fixed(a.delta, 4)))))));
}
