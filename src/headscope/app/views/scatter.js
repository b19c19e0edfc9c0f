// Head selector (default view): a canvas scatter of every head in metrics.json with x, y and
// colour chosen from any metric column (plus layer and head index), a layer-range filter, a
// jump-to-head box and the list of heads at the extreme of the y metric.

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, select, parseHead } from '../lib/dom.js';
import { viridis, MUTED } from '../lib/color.js';
import { ScatterPlot } from '../lib/canvasplot.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { exportButtons } from '../lib/export.js';

const DISCRETE = new Set(['layer', 'head']);

function label(col) {
  return col === 'layer' ? 'layer' : col === 'head' ? 'head index' : col.replace(/_/g, ' ');
}

/** One line per ordinal column with named levels (metrics.json `levels`): heads per level,
 * model-wide (e.g. the z-dictionary classes: "3 monosemantic · 1 bisemantic · …"). */
function levelTallies(m) {
  return Object.entries(m.levels).filter(([col]) => m.has(col)).map(([col, names]) => {
    const v = m.col(col);
    const counts = Object.keys(names).map((k) => [names[k], v.filter((x) => x === Number(k)).length]);
    const n = counts.reduce((s, [, c]) => s + c, 0);
    return h('div', { class: 'level-tally', 'data-column': col },
      h('strong', {}, label(col)), ` — ${n} of ${m.names.length} heads: `,
      counts.map(([name, c]) => `${c} ${name}`).join(' · '));
  });
}

export function mount(root, ctx) {
  let m = null;
  let plot = null;
  let els = null;
  let shown = [];
  let onResize = null;
  const container = h('div', { class: 'view view-heads' }, loading('Loading metrics…'));
  root.append(container);

  function settings(c) {
    const cols = ['layer', 'head', ...m.metricNames];
    const pick = (name, dflt) => (cols.includes(c.get(name)) ? c.get(name) : dflt);
    const first = m.metricNames[0] || 'head';
    const y = pick('y', m.has('induction_score') ? 'induction_score' : first);
    const col = pick('c', m.has('prev_token_score') ? 'prev_token_score' : first);
    const last = m.nLayers - 1;
    const int = (name, dflt) => {
      const v = parseInt(c.get(name, String(dflt)), 10);
      return Math.min(last, Math.max(0, Number.isFinite(v) ? v : dflt));
    };
    const a = int('l0', 0);
    const b = int('l1', last);
    return { cols, x: pick('x', 'layer'), y, c: col, l0: Math.min(a, b), l1: Math.max(a, b) };
  }

  // an ordinal column with named levels (e.g. zsae_class 1..4) is discrete too
  const discrete = (col) => DISCRETE.has(col) || m.levels[col] !== undefined;

  /** Value of column `col` for row i, spreading discrete columns so marks don't stack. */
  function coord(col, i) {
    const v = m.col(col)[i];
    if (col === 'layer') return v + ((m.head[i] + 0.5) / m.nHeads - 0.5) * 0.72;
    if (col === 'head') return v + ((m.layer[i] + 0.5) / Math.max(1, m.nLayers) - 0.5) * 0.72;
    if (m.levels[col]) return v + ((m.head[i] + 0.5) / m.nHeads - 0.5) * 0.72;
    return v;
  }

  /** Visible integer range of a discrete column (the layer filter narrows `layer`). */
  function range(col, st) {
    if (m.levels[col]) {
      const keys = Object.keys(m.levels[col]).map(Number);
      return [Math.min(...keys), Math.max(...keys)];
    }
    return col === 'layer' ? [st.l0, st.l1] : [0, m.nHeads - 1];
  }

  function domain(col, st) {
    if (!discrete(col)) return null;
    const [lo, hi] = range(col, st);
    return [lo - 0.6, hi + 0.6];
  }

  function integerTicks(col, st) {
    if (!discrete(col)) return null;
    const [lo, hi] = range(col, st);
    const step = Math.max(1, Math.ceil((hi - lo + 1) / 16));
    const t = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) t.push(v);
    return t;
  }

  function tooltip(i) {
    const st = settings(ctx);
    const rows = m.metricNames.map((name) => h('tr', { class: [st.x, st.y, st.c].includes(name) ? 'em' : '' },
      h('td', {}, label(name)), h('td', { class: 'num' }, fmt(m.col(name)[i]))));
    return [h('div', { class: 'tip-title' }, m.names[i], h('span', { class: 'muted' }, `  layer ${m.layer[i]} · head ${m.head[i]}`)),
      h('table', { class: 'tip-table' }, rows),
      Object.keys(m.levels).filter((c) => m.has(c) && m.levels[c][String(m.col(c)[i])]).map((c) => h('div', { class: 'small' }, `${label(c)}: ${m.levels[c][String(m.col(c)[i])]}`)),
      h('div', { class: 'muted small' }, 'click to open')];
  }

  function draw(c) {
    const st = settings(c);
    for (const [k, el] of Object.entries(els.selects)) el.value = st[k];
    els.l0.value = st.l0;
    els.l1.value = st.l1;
    shown = [];
    for (let i = 0; i < m.names.length; i++) if (m.layer[i] >= st.l0 && m.layer[i] <= st.l1) shown.push(i);
    const cv = m.col(st.c);
    let lo = Infinity;
    let hi = -Infinity;
    for (const i of shown) if (Number.isFinite(cv[i])) { lo = Math.min(lo, cv[i]); hi = Math.max(hi, cv[i]); }
    if (!Number.isFinite(lo)) lo = 0;
    if (!(hi > lo)) { hi = lo + 1; }
    const colors = shown.map((i) => (Number.isFinite(cv[i]) ? viridis((cv[i] - lo) / (hi - lo)) : MUTED));
    plot.setData({
      x: shown.map((i) => coord(st.x, i)),
      y: shown.map((i) => coord(st.y, i)),
      colors,
      labels: shown.map((i) => m.names[i]),
      xLabel: label(st.x),
      yLabel: label(st.y),
      xDomain: domain(st.x, st),
      yDomain: domain(st.y, st),
      xTicks: integerTicks(st.x, st),
      yTicks: integerTicks(st.y, st),
      colorBar: { scale: viridis, lo, hi, label: label(st.c) },
    });
    ctx.hooks.markCount = shown.length;
    ctx.hooks.marks = shown.map((i, j) => ({ name: m.names[i], x: plot.px[j], y: plot.py[j] }));
    els.count.textContent = `${shown.length} of ${m.names.length} heads`;
    els.doc.textContent = '';
    for (const [axis, col] of [['y', st.y], ['x', st.x], ['colour', st.c]]) {
      if (m.docs[col]) els.doc.append(h('div', {}, h('strong', {}, `${axis}: ${label(col)}`), ` — ${m.docs[col]}`));
    }
    drawTop(st);
  }

  function drawTop(st) {
    const yv = m.col(st.y);
    const key = (i) => (Number.isFinite(yv[i]) ? yv[i] : -Infinity); // undefined values last
    const top = [...shown].sort((a, b) => key(b) - key(a)).slice(0, 15);
    clear(els.top).append(
      h('h3', {}, `Highest ${label(st.y)}`),
      h('table', { class: 'data compact' },
        h('thead', {}, h('tr', {}, h('th', {}, 'head'), h('th', { class: 'num' }, label(st.y)), h('th', { class: 'num' }, label(st.c)))),
        h('tbody', {}, top.map((i) => h('tr', {},
          h('td', {}, h('a', { href: ctx.href(['head', m.names[i]]) }, m.names[i])),
          h('td', { class: 'num' }, fmt(yv[i])),
          h('td', { class: 'num' }, fmt(m.col(st.c)[i])))))));
  }

  function jump(ev) {
    ev.preventDefault();
    const p = parseHead(els.jump.value);
    if (!p || !m.index.has(p.name)) {
      els.jumpMsg.textContent = p ? `${p.name} is not in this run` : 'type a head like L5H3';
      return;
    }
    ctx.go(['head', p.name]);
  }

  function hover(j, ev) {
    const t0 = ev.timeStamp;
    if (j < 0) hideTip();
    else showTip(tooltip(shown[j]), ev.clientX, ev.clientY);
    const now = performance.now();
    // Event creation → tooltip shown (includes the browser's input queueing), and the part
    // spent in our handler (grid lookup + tooltip).
    ctx.hooks.lastHoverMs = now - t0;
    ctx.hooks.lastHoverHandlerMs = now - plot.moveStart;
    ctx.hooks.hovered = j < 0 ? null : m.names[shown[j]];
  }

  data.metrics().then((metrics) => {
    m = metrics;
    if (!m.names.length) throw new Error('metrics.json has no heads.');
    const st = settings(ctx);
    const opts = st.cols.map((c) => [c, label(c), m.docs[c] || '']);
    const selects = {
      x: select(opts, st.x, (v) => ctx.set({ x: v }), { id: 'sel-x', 'aria-label': 'x axis' }),
      y: select(opts, st.y, (v) => ctx.set({ y: v }), { id: 'sel-y', 'aria-label': 'y axis' }),
      c: select(opts, st.c, (v) => ctx.set({ c: v }), { id: 'sel-c', 'aria-label': 'colour' }),
    };
    const num = (id, v, lab) => h('input', { id, type: 'number', min: 0, max: m.nLayers - 1, value: v, class: 'num-input', 'aria-label': lab });
    const l0 = num('layer-min', st.l0, 'lowest layer');
    const l1 = num('layer-max', st.l1, 'highest layer');
    const onRange = () => ctx.set({ l0: l0.value === '0' ? null : l0.value, l1: Number(l1.value) === m.nLayers - 1 ? null : l1.value });
    l0.addEventListener('change', onRange);
    l1.addEventListener('change', onRange);
    const jumpInput = h('input', { id: 'jump', type: 'text', placeholder: 'L5H3', size: 8, 'aria-label': 'jump to head', autocomplete: 'off', spellcheck: 'false' });
    const jumpMsg = h('span', { class: 'muted small', 'aria-live': 'polite' });
    const count = h('span', { class: 'muted' });
    const doc = h('div', { class: 'metric-docs' });
    const top = h('div', { class: 'side-list' });
    const width = Math.max(480, container.clientWidth - 300);
    const height = Math.max(420, Math.min(640, window.innerHeight - 250));
    plot = new ScatterPlot({ width, height, onHover: hover, onClick: (j) => ctx.go(['head', m.names[shown[j]]]), ariaLabel: 'scatter plot of heads' });
    els = { selects, l0, l1, jump: jumpInput, jumpMsg, count, doc, top };
    clear(container).append(
      h('div', { class: 'toolbar' },
        h('label', {}, 'x ', selects.x),
        h('label', {}, 'y ', selects.y),
        h('label', {}, 'colour ', selects.c),
        h('span', { class: 'sep' }),
        h('label', {}, 'layers ', l0, ' – ', l1),
        h('span', { class: 'sep' }),
        h('form', { class: 'inline', onsubmit: jump }, h('label', {}, 'open head ', jumpInput), ' ', jumpMsg),
        h('span', { class: 'grow' }),
        count,
        exportButtons('heads', { svg: () => plot.toSVG(`Heads: ${label(settings(ctx).y)} vs ${label(settings(ctx).x)}`), png: () => plot.canvas })),
      h('div', { class: 'split' }, h('div', { class: 'panel plot-panel' }, plot.el, levelTallies(m), doc), top));
    draw(ctx);
    onResize = () => {
      const w = Math.max(480, container.clientWidth - 300);
      if (Math.abs(w - plot.width) > 20) { plot.resize(w); draw(ctx); }
    };
    window.addEventListener('resize', onResize);
    ctx.hooks.markPositions = () => plot.clientPositions().map(([x, y], j) => ({ name: m.names[shown[j]], x, y }));
    ctx.ready('heads');
  }).catch((err) => clear(container).append(errorBox(err)));

  return {
    update(c) {
      if (!m || !plot) return false;
      ctx = c;
      draw(c);
      return true;
    },
    unmount() {
      if (onResize) window.removeEventListener('resize', onResize);
      hideTip();
    },
  };
}
