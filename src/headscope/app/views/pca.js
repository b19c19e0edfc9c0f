// PCA tab of the head page: Q, K and O activations of the head on its top (query, key) pairs,
// projected on two chosen principal components. Points are coloured by a user rule: a regex on
// the query or key token (matches highlighted), or the query–key distance. Hovering a point
// rings the same pair in all three plots and shows the tokens around its key and query (stored
// with every point); clicking it opens that pair in the examples tab when the sequence is one
// of the stored examples. URL params: px, py, rule, re.

import { h, clear, fmt } from '../lib/dom.js';
import { viridis, gradient, HIGHLIGHT, MUTED } from '../lib/color.js';
import { ScatterPlot } from '../lib/canvasplot.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { labelToken } from '../lib/tokens.js';
import { exportButtons, svgToCanvas } from '../lib/export.js';
import { s, svgRoot } from '../lib/svg.js';

const SPACES = [['q', 'Q (queries)'], ['k', 'K (keys)'], ['o', 'O (outputs)']];

export function renderPCA(el, { payload, ctx, name }) {
  const pca = payload.pca;
  if (!pca || !pca.points || !pca.points.length) {
    el.append(h('div', { class: 'note' }, 'This run has no PCA data for this head.'));
    return {};
  }
  const pts = pca.points;
  const nComp = Math.min(...SPACES.map(([k]) => (pca[k] && pca[k].coords[0] ? pca[k].coords[0].length : 0)));
  const pcOpts = Array.from({ length: nComp }, (_, i) => [String(i + 1), `PC${i + 1}`]);
  const seqToExample = new Map((payload.examples || []).map((ex, i) => [ex.sequence, i]));

  const sel = (id, lab, opts) => h('select', { id, 'aria-label': lab }, opts.map(([v, t]) => h('option', { value: v }, t)));
  const px = sel('pca-x', 'x component', pcOpts);
  const py = sel('pca-y', 'y component', pcOpts);
  const rule = sel('pca-rule', 'colour rule', [['query', 'query token matches'], ['key', 'key token matches'], ['distance', 'query–key distance']]);
  const re = h('input', { id: 'pca-regex', type: 'text', placeholder: 'regex, e.g. ^\\d+$', size: 18, 'aria-label': 'regex', spellcheck: 'false', autocomplete: 'off' });
  const info = h('span', { class: 'muted small', 'aria-live': 'polite' });
  const legendEl = h('span', { class: 'legend' });
  let timer = null;
  px.addEventListener('change', () => ctx.set({ px: px.value === '1' ? null : px.value }, { replace: true }));
  py.addEventListener('change', () => ctx.set({ py: py.value === '2' ? null : py.value }, { replace: true }));
  rule.addEventListener('change', () => ctx.set({ rule: rule.value === 'query' ? null : rule.value }, { replace: true }));
  re.addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(() => ctx.set({ re: re.value || null }, { replace: true }), 120);
  });

  // Three plots per row: each cell adds 14 px of padding and border, the grid 8 px gaps.
  const avail = Math.max(900, el.clientWidth || 900);
  const w = Math.max(280, Math.floor((avail - 3 * 14 - 2 * 8 - 2) / 3));
  const plots = SPACES.map(([key, lab]) => {
    const title = h('h4', {});
    const p = new ScatterPlot({
      width: w, height: Math.round(w * 0.9), ariaLabel: `PCA of ${lab}`,
      onHover: (i, ev) => hover(i, ev),
      onClick: (i) => open(i),
    });
    return { key, lab, p, title, wrap: h('div', { class: 'pca-cell' }, title, p.el) };
  });

  // The stored context of a point: its spans of tokens with the key and the query marked,
  // "…" where the sequence goes on (or between the key's and the query's stretches).
  function contextLine(pt) {
    const spans = pt.context || [];
    if (!spans.length) return null;
    const parts = [];
    spans.forEach((span, j) => {
      if (j > 0 || span.start > 0) parts.push(h('span', { class: 'ctx-gap' }, j > 0 ? ` …${span.start - spans[j - 1].start - spans[j - 1].tokens.length} tokens… ` : '… '));
      (span.strs || span.tokens.map(String)).forEach((str, k) => {
        const pos = span.start + k;
        const role = pos === pt.q_pos && pos === pt.k_pos ? 'ctx-query ctx-key' : pos === pt.q_pos ? 'ctx-query' : pos === pt.k_pos ? 'ctx-key' : '';
        parts.push(h('span', { class: `ctx-tok ${role}`, title: `position ${pos}` }, labelToken(str)));
      });
    });
    return h('div', { class: 'pca-context' }, parts);
  }

  function hover(i, ev) {
    for (const pl of plots) pl.p.setHover(i, true);
    if (i < 0) { hideTip(); return; }
    const pt = pts[i];
    showTip([
      h('div', { class: 'tip-title' }, `“${labelToken(pt.query)}” → “${labelToken(pt.key)}”`),
      h('div', {}, `distance ${pt.distance} · sequence ${pt.sequence} · positions ${pt.q_pos} → ${pt.k_pos}`),
      pt.norm !== undefined ? h('div', {}, `output norm ${fmt(pt.norm, 3)}`) : null,
      contextLine(pt),
      h('div', { class: 'muted small' }, (pt.context && pt.context.length ? 'key in orange, query in blue · ' : '') + (seqToExample.has(pt.sequence) ? 'click to open this pair in its example' : 'this sequence is not among the head’s stored examples')),
    ], ev.clientX, ev.clientY);
  }

  function open(i) {
    const pt = pts[i];
    if (!seqToExample.has(pt.sequence)) return;
    ctx.go(['head', name], { ex: seqToExample.get(pt.sequence), q: pt.q_pos, k: pt.k_pos });
  }

  function settings(c) {
    const clampPc = (v, d) => { const n = parseInt(v, 10); return n >= 1 && n <= nComp ? n : d; };
    const r = ['query', 'key', 'distance'].includes(c.get('rule')) ? c.get('rule') : 'query';
    return { x: clampPc(c.get('px'), 1), y: clampPc(c.get('py'), Math.min(2, nComp)), rule: r, re: c.get('re', '') };
  }

  function draw(c) {
    const st = settings(c);
    px.value = String(st.x);
    py.value = String(st.y);
    rule.value = st.rule;
    if (document.activeElement !== re) re.value = st.re;
    re.disabled = st.rule === 'distance';
    let colors;
    let order = null;
    info.classList.remove('error-text');
    clear(legendEl);
    if (st.rule === 'distance') {
      // Distances are heavy-tailed (mostly 1–3, a few hundreds): colour on a log scale.
      const d = pts.map((p) => Math.log1p(p.distance));
      const hi = Math.max(1e-9, ...d);
      colors = d.map((v) => viridis(v / hi));
      const dmax = Math.max(...pts.map((p) => p.distance));
      legendEl.append(`${Math.min(...pts.map((p) => p.distance))} `, h('span', { class: 'legend-bar', style: { background: gradient(viridis) } }), ` ${dmax} tokens (log scale)`);
      info.textContent = 'colour = query–key distance';
    } else {
      let rx = null;
      try { rx = st.re ? new RegExp(st.re) : null; } catch (err) {
        info.textContent = `invalid regex: ${err.message}`;
        info.classList.add('error-text');
      }
      const match = pts.map((p) => Boolean(rx && rx.test(st.rule === 'key' ? p.key : p.query)));
      const nMatch = match.filter(Boolean).length;
      colors = match.map((mm) => (mm ? HIGHLIGHT : rx ? MUTED : '#4c72b0'));
      order = [...pts.keys()].sort((a, b) => match[a] - match[b]);
      if (rx) {
        const dot = (color) => h('span', { class: 'dot', style: { background: color } });
        legendEl.append(dot(HIGHLIGHT), ` ${st.rule} token matches`, dot(MUTED), ' other');
        info.textContent = `${nMatch} of ${pts.length} pairs match`;
      } else if (!info.classList.contains('error-text')) {
        info.textContent = `${pts.length} (query, key) pairs with the largest output norm · type a regex to highlight tokens`;
      }
      ctx.hooks.pcaMatches = nMatch;
    }
    for (const pl of plots) {
      const coords = pca[pl.key].coords;
      const vr = pca[pl.key].variance_ratio || [];
      const pct = (j) => (vr[j] !== undefined ? ` (${(vr[j] * 100).toFixed(1)}%)` : '');
      pl.title.textContent = pl.lab;
      pl.p.setData({
        x: coords.map((r) => r[st.x - 1]), y: coords.map((r) => r[st.y - 1]), colors, order,
        xLabel: `PC${st.x}${pct(st.x - 1)}`, yLabel: `PC${st.y}${pct(st.y - 1)}`,
        labels: pts.map((p) => `${labelToken(p.query)} → ${labelToken(p.key)}`),
      });
    }
    ctx.hooks.pcaPoints = pts.length;
    ctx.hooks.pcaPositions = () => plots[0].p.clientPositions().map(([x, y], i) => ({ i, x, y }));
  }

  function svgAll() {
    const parts = plots.map((pl) => pl.p.toSVG(pl.lab));
    const W = parts.reduce((a, p) => a + Number(p.getAttribute('width')), 0);
    const H = Math.max(...parts.map((p) => Number(p.getAttribute('height'))));
    let x = 0;
    const g = parts.map((p) => {
      const wrap = s('g', { transform: `translate(${x} 0)` }, ...p.childNodes);
      x += Number(p.getAttribute('width'));
      return wrap;
    });
    return svgRoot(W, H + 24, s('text', { x: 10, y: 16, 'font-size': 13, 'font-weight': 600 }, `${name} · PCA of Q, K, O`), s('g', { transform: 'translate(0 22)' }, g));
  }

  el.append(
    h('div', { class: 'toolbar' },
      h('label', {}, 'x ', px), h('label', {}, 'y ', py),
      h('span', { class: 'sep' }),
      h('label', {}, 'colour by ', rule), re,
      info, legendEl,
      h('span', { class: 'grow' }),
      exportButtons(`${name}_pca`, { svg: svgAll, png: () => svgToCanvas(svgAll()) })),
    h('p', { class: 'muted small' }, 'PCA is a hypothesis generator: clusters hint at distinct behaviours, but a continuous cloud does not rule them out.'),
    h('div', { class: 'pca-grid' }, plots.map((pl) => pl.wrap)));
  draw(ctx);

  return {
    update(c) {
      ctx = c;
      draw(c);
    },
    unmount() {
      clearTimeout(timer);
      hideTip();
      clear(el);
    },
  };
}
