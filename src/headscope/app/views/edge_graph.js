// Edge graph (#/edges?text=…&layer=L&feature=F&pos=P[&depth=&top=&rank=&bos=1]), live server: the largest
// attention-mediated edges into one dictionary feature (layer L, position P) from features of the
// layer before at positions up to P, each split over that layer's heads (head loadings, as in
// “Tracing Attention Computation Through Feature Interactions”) plus the residual and MLP bypass;
// `depth` layer pairs back. Features are boxes (columns by layer, rows by position), edges are
// curves whose width is |edge| and whose label names the head carrying most of it.

import * as data from '../data.js';
import { h, clear, fmt, fixed, errorBox, loading, needsServer } from '../lib/dom.js';
import { s, svgRoot, fitText } from '../lib/svg.js';
import { labelToken } from '../lib/tokens.js';
import { exportButtons } from '../lib/export.js';
import { featureHref } from './feature.js';

const BOX_W = 230;
const BOX_H = 42;
const ROW = 56;
const COL_GAP = 190;
const PAD = 24;
const POS = '#b2182b';
const NEG = '#2166ac';
const EXAMPLE = 'The cat sat on the mat. The cat sat on the';

/** '#/edges?…' for a target feature on a text (the head-loadings panel and feature pages link here). */
export function edgeGraphHref(ctx, { text, layer, feature = null, pos = -1 }) {
  return ctx.href(['edges'], { text, layer, feature, pos });
}

function intParam(ctx, name, dflt = null) {
  const v = ctx.get(name);
  const n = v === null || v === '' ? NaN : Number(v);
  return Number.isInteger(n) ? n : dflt;
}

const nodeTitle = (n) => `L${n.layer}/${n.index} @${n.position} “${labelToken(n.token)}”`;

function topHeads(e, k = 3) {
  return e.heads.slice(0, k).map((x) => `${x.head} ${fmt(x.loading, 3)} (${fixed(100 * x.share, 0)}%)`).join(', ');
}

function headSum(e) {
  return e.heads.reduce((acc, x) => acc + x.loading, 0);
}

/** The route carrying most of an edge: the head with the largest loading (and its share of the
 * heads) when the heads carry most, else the residual connection or the MLP. */
function routeLabel(e) {
  const heads = Math.abs(headSum(e));
  const res = Math.abs(e.residual);
  const mlp = Math.abs(e.mlp);
  if (heads >= res && heads >= mlp) return `${e.heads[0].head} ${fixed(100 * e.heads[0].share, 0)}%`;
  return res >= mlp ? 'residual' : 'MLP';
}

/** The graph as an <svg>: one column per layer (earliest left), nodes by position. */
export function edgeGraphSVG(r, ctx = null) {
  const layers = [...new Set(r.nodes.map((n) => n.layer))].sort((a, b) => a - b);
  const byLayer = new Map(layers.map((l) => [l, r.nodes.filter((n) => n.layer === l)
    .sort((a, b) => a.position - b.position || a.index - b.index)]));
  const rows = Math.max(1, ...[...byLayer.values()].map((v) => v.length));
  const W = PAD * 2 + layers.length * BOX_W + (layers.length - 1) * COL_GAP;
  const top = PAD + 22;
  const H = top + rows * ROW + PAD;
  const at = new Map();
  layers.forEach((l, c) => {
    const col = byLayer.get(l);
    const off = ((rows - col.length) * ROW) / 2; // short columns centred
    col.forEach((n, i) => at.set(n.id, { x: PAD + c * (BOX_W + COL_GAP), y: top + off + i * ROW }));
  });
  const parts = layers.map((l, c) => s('text', {
    x: PAD + c * (BOX_W + COL_GAP) + BOX_W / 2, y: PAD + 6, 'text-anchor': 'middle', 'font-size': 12, 'font-weight': 600, fill: '#555b66',
  }, `layer ${l}`));
  // width: what the graph is ranked by (the whole edge, or the heads' part of it), relative to
  // the largest of the same layer pair (pairs differ in scale)
  const size = (e) => (r.rank_by === 'heads' ? headSum(e) : e.edge);
  const pairMax = new Map();
  for (const e of r.edges) {
    const l = r.nodes.find((n) => n.id === e.source).layer;
    pairMax.set(l, Math.max(pairMax.get(l) || 1e-12, Math.abs(size(e))));
  }
  const nodes = new Map(r.nodes.map((n) => [n.id, n]));
  const labels = [];
  const edges = [...r.edges].sort((a, b) => Math.abs(size(a)) - Math.abs(size(b))); // big ones on top
  for (const e of edges) {
    const a = at.get(e.source);
    const b = at.get(e.target);
    const src = nodes.get(e.source);
    const tgt = nodes.get(e.target);
    const x1 = a.x + BOX_W;
    const y1 = a.y + BOX_H / 2;
    const x2 = b.x;
    const y2 = b.y + BOX_H / 2;
    const mx = (x1 + x2) / 2;
    const rel = Math.abs(size(e)) / pairMax.get(src.layer);
    const color = size(e) >= 0 ? POS : NEG;
    const tip = `${src.feature}@${src.position} → ${tgt.feature}@${tgt.position}\n`
      + `edge ${fmt(e.edge, 4)} = heads ${fmt(headSum(e), 4)} + residual ${fmt(e.residual, 4)} + MLP ${fmt(e.mlp, 4)}\n`
      + e.heads.slice(0, 5).map((x) => `${x.head}: loading ${fmt(x.loading, 4)} · share ${fixed(100 * x.share, 1)}% · attention ${fixed(x.attention, 3)}`).join('\n');
    const lead = e.heads[0];
    const labelEl = lead ? s('text', {
      x: mx, y: (y1 + y2) / 2, 'text-anchor': 'middle', 'dominant-baseline': 'middle', 'font-size': 11, fill: color,
      stroke: '#ffffff', 'stroke-width': 3, 'paint-order': 'stroke', class: 'edge-label',
    }, routeLabel(e)) : null;
    if (labelEl) labels.push({ y: (y1 + y2) / 2, gap: src.layer, el: labelEl });
    parts.push(s('g', { class: 'edge', 'data-source': e.source, 'data-target': e.target, 'data-edge': e.edge },
      s('path', {
        d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
        fill: 'none', stroke: color, 'stroke-width': (1.2 + 9 * rel).toFixed(2), 'stroke-opacity': 0.55,
      }),
      labelEl,
      s('title', {}, tip)));
  }
  // labels sit at each curve's midpoint; where two would touch, the lower one moves down
  for (const gap of new Set(labels.map((l) => l.gap))) {
    let last = -Infinity;
    for (const l of labels.filter((x) => x.gap === gap).sort((a, b) => a.y - b.y)) {
      l.y = Math.max(l.y, last + 14);
      last = l.y;
      l.el.setAttribute('y', l.y.toFixed(1));
    }
  }
  for (const n of r.nodes) {
    const p = at.get(n.id);
    const isTarget = n.id === r.target;
    const sub = n.label ? n.label : `activation ${fixed(n.activation, 3)}`;
    const box = s('g', { class: 'node', 'data-node': n.id },
      s('rect', {
        x: p.x, y: p.y, width: BOX_W, height: BOX_H, rx: 6,
        fill: isTarget ? '#efe7f7' : '#fff3e6', stroke: isTarget ? '#6a51a3' : '#f16913', 'stroke-width': isTarget ? 2 : 1.2,
      }),
      s('text', { x: p.x + 9, y: p.y + 17, 'font-size': 12, 'font-weight': 600 }, fitText(`${nodeTitle(n)} · ${fixed(n.activation, 2)}`, BOX_W - 18, 12)),
      s('text', { x: p.x + 9, y: p.y + 33, 'font-size': 11, fill: '#555b66' }, fitText(sub, BOX_W - 18, 11)),
      s('title', {}, `${n.feature} at position ${n.position} “${labelToken(n.token)}”\nactivation ${fixed(n.activation, 4)}${n.label ? `\n${n.label}` : ''}`));
    const href = featureHref(ctx, n.feature);
    parts.push(href ? s('a', { href, class: 'graph-feature', 'data-feature': n.feature }, box) : box);
  }
  return svgRoot(W, H, parts);
}

function edgeTable(r) {
  const nodes = new Map(r.nodes.map((n) => [n.id, n]));
  const name = (id) => {
    const n = nodes.get(id);
    return h('span', { title: n.label || '' }, `${n.feature}@${n.position} `, h('span', { class: 'muted' }, `“${labelToken(n.token)}”`));
  };
  return h('table', { class: 'data compact edge-table' },
    h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', {}, 'source'), h('th', {}, 'target'),
      h('th', { class: 'num' }, 'edge'), h('th', { class: 'num', title: 'sum of the head loadings' }, 'heads'),
      h('th', {}, 'top heads (loading, share)'), h('th', { class: 'num' }, 'residual'), h('th', { class: 'num' }, 'MLP'))),
    h('tbody', {}, r.edges.map((e, i) => h('tr', { 'data-source': e.source, 'data-target': e.target },
      h('td', { class: 'num muted' }, i + 1), h('td', {}, name(e.source)), h('td', {}, name(e.target)),
      h('td', { class: 'num edge-value' }, fmt(e.edge, 4)), h('td', { class: 'num' }, fmt(headSum(e), 4)),
      h('td', { class: 'small' }, topHeads(e)), h('td', { class: 'num' }, fmt(e.residual, 4)), h('td', { class: 'num' }, fmt(e.mlp, 4))))));
}

function form(ctx, q) {
  const text = h('textarea', { rows: 3, 'aria-label': 'text', spellcheck: 'false', class: 'edge-text' });
  text.value = q.text || EXAMPLE;
  const num = (name, value, label, attrs = {}) => h('label', { class: 'small' }, `${label} `,
    h('input', { type: 'number', name, value: value ?? '', style: { width: '5em' }, ...attrs }));
  const rank = h('select', { name: 'rank' }, h('option', { value: 'edge' }, 'whole edge'), h('option', { value: 'heads' }, 'heads only'));
  rank.value = q.rank;
  const el = h('form', { class: 'panel edge-form' },
    text,
    h('div', { class: 'edge-controls' },
      num('layer', q.layer, 'target layer', { min: 1 }), ' ',
      num('feature', q.feature, 'feature', { min: 0, placeholder: 'most active' }), ' ',
      num('pos', q.pos, 'position'), ' ',
      num('depth', q.depth, 'layer pairs', { min: 1, max: 4 }), ' ',
      num('top', q.top, 'edges per pair', { min: 1, max: 50 }), ' ',
      h('label', { class: 'small' }, 'rank by ', rank), ' ',
      h('label', { class: 'small', title: 'also score sources at position 0, the BOS token where most heads park their attention' },
        h('input', { type: 'checkbox', name: 'bos', checked: q.bos }), ' BOS sources'), ' ',
      h('button', { type: 'submit' }, 'Draw')));
  el.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const f = new FormData(el);
    ctx.set({ text: text.value, layer: f.get('layer'), feature: f.get('feature'), pos: f.get('pos'), depth: f.get('depth'), top: f.get('top'), rank: f.get('rank'), bos: f.get('bos') ? 1 : null });
  });
  return el;
}

function render(el, r, ctx, q) {
  const target = r.nodes.find((n) => n.id === r.target);
  const tokens = h('div', { class: 'edge-tokens', title: 'click a token: the edge graph of the most active feature there' },
    r.tokens.map((t, i) => h('span', {
      class: `ctx-tok${i === target.position ? ' ctx-at' : ''}`,
      'data-pos': i,
      style: {
        cursor: 'pointer', display: 'inline-block', whiteSpace: 'pre', padding: '0 2px', margin: '1px', borderRadius: '2px',
        background: i === target.position ? '#dadaeb' : '#f3f4f6', outline: i === target.position ? '1.5px solid #3f007d' : 'none',
      },
      onclick: () => ctx.set({ pos: i, feature: null }),
    }, labelToken(t))));
  const alts = r.alternatives.length
    ? h('p', { class: 'small edge-alternatives' }, `features of layer ${target.layer} firing at position ${target.position}: `,
      r.alternatives.map((a) => h('button', {
        type: 'button', class: `small chip${a.index === target.index ? ' current' : ''}`, title: a.label || a.feature, 'data-feature': a.index,
        onclick: () => ctx.set({ feature: a.index }),
      }, `${a.index} · ${fixed(a.activation, 2)}`)))
    : null;
  const summary = r.edges.length
    ? `${r.edges.length} edges · candidates scored per layer pair: ${r.scored.join(', ')} · ranked by |${r.rank_by === 'heads' ? 'sum of head loadings' : 'whole edge'}|`
    : target.activation > 0 ? 'no edges' : `${target.feature} does not fire at position ${target.position}: it has no incoming edges; pick a feature that fires there`;
  const graph = r.edges.length ? edgeGraphSVG(r, ctx) : null;
  clear(el).append(
    h('h1', {}, `Edge graph into ${target.feature} @${target.position} “${labelToken(target.token)}”`),
    target.label ? h('p', { class: 'feature-label' }, target.label) : null,
    form(ctx, q),
    tokens,
    alts,
    h('section', { class: 'panel edge-graph' },
      h('div', { class: 'panel-head' }, h('h3', {}, 'Features and the heads between them'),
        h('span', { class: 'muted small edge-summary' }, ` ${summary}`), h('span', { class: 'grow' }),
        graph ? exportButtons(`edges_L${target.layer}_${target.index}_${target.position}`, { svg: () => edgeGraphSVG(r, ctx) }) : null),
      h('p', { class: 'muted small' },
        'An edge is what one source feature at its position adds to the target feature’s pre-activation (read by its ',
        `${r.target_vector}), times both activations, with attention patterns and norm scales frozen and the MLP linearised. `,
        'It splits exactly into one loading per head of the source layer (attention × OV in the feature basis), the residual connection (same position only) and the MLP. ',
        `Width ∝ |${r.rank_by === 'heads' ? 'the heads’ part of the edge' : 'edge'}| within a layer pair; red positive, blue negative; `,
        'the label names the route carrying most of the edge: the head with the largest loading (its share of the heads), else “residual” or “MLP”. Hover an edge for its heads.'),
      graph ? h('div', { class: 'figure-scroll' }, graph) : null,
      r.edges.length ? edgeTable(r) : null));
}

export function mount(root, ctx) {
  let alive = true;
  const el = h('div', { class: 'view view-edges' }, loading('Checking for a live server…'));
  root.append(el);
  const q = {
    text: ctx.get('text'),
    layer: intParam(ctx, 'layer', 1),
    feature: intParam(ctx, 'feature'),
    pos: intParam(ctx, 'pos', -1),
    depth: intParam(ctx, 'depth', 1),
    top: intParam(ctx, 'top', 8),
    rank: ctx.get('rank') === 'heads' ? 'heads' : 'edge',
    bos: ctx.get('bos') === '1',
  };
  data.liveStatus().then(async (st) => {
    if (!alive) return;
    if (!st.live) {
      clear(el).append(h('h1', {}, 'Edge graph'), needsServer('The edge graph', st.server));
      ctx.ready('edges');
      return;
    }
    if (!q.text) {
      clear(el).append(h('h1', {}, 'Edge graph'),
        h('p', { class: 'muted' }, 'The largest attention-mediated edges into a dictionary feature at one position, split over heads. Pick a text, a layer and a position (the feature defaults to the most active one there).'),
        form(ctx, q));
      ctx.ready('edges');
      return;
    }
    clear(el).append(h('h1', {}, 'Edge graph'), loading('Scoring every edge…'));
    try {
      const req = { text: q.text, layer: q.layer, position: q.pos, depth: q.depth, top: q.top, rank_by: q.rank, include_bos: q.bos };
      if (q.feature !== null) req.feature = q.feature;
      const r = await data.api.edgeGraph(req);
      if (!alive) return;
      ctx.hooks.edgeGraph = r;
      render(el, r, ctx, q);
    } catch (err) {
      if (alive) clear(el).append(h('h1', {}, 'Edge graph'), errorBox(err), form(ctx, q));
    }
    ctx.ready('edges');
  });
  return { unmount() { alive = false; } };
}
