// Similar heads tab: the nearest heads by pattern-motif distance (from the head JSON's
// `similar`), each with a thumbnail of its top example's attention pattern, and the 2-D head
// map from motifs/map.json coloured by any metric. URL params: map (isomap|tsne|…), mc.

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, select } from '../lib/dom.js';
import { viridis } from '../lib/color.js';
import { ScatterPlot } from '../lib/canvasplot.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { exportButtons } from '../lib/export.js';
import { s, svgRoot } from '../lib/svg.js';
import { renderAcross } from './across.js';

const THUMB = 112;

/**
 * Draw the sparse pattern of `ex` as an image: white → dark blue by weight. Sequences longer
 * than the thumbnail are max-pooled to its pixel size, so a strong entry stays visible instead
 * of being lost when the browser scales a T×T image down.
 */
export function patternThumbnail(ex) {
  const T = Math.max(1, ex.tokens.length);
  const S = Math.min(T, THUMB * (window.devicePixelRatio > 1 ? 2 : 1));
  const c = h('canvas', { class: 'thumb', width: S, height: S, style: { width: `${THUMB}px`, height: `${THUMB}px` } });
  const ctx = c.getContext('2d');
  const img = ctx.createImageData(S, S);
  const cell = (pos) => Math.min(S - 1, Math.floor((pos * S) / T));
  for (let i = 0; i < S * S; i++) {
    const q = Math.floor(i / S);
    const k = i % S;
    const shade = k <= q ? 250 : 236;
    img.data[i * 4] = shade; img.data[i * 4 + 1] = shade; img.data[i * 4 + 2] = k <= q ? 252 : 240; img.data[i * 4 + 3] = 255;
  }
  const pooled = new Float32Array(S * S);
  for (const [q, k, w] of ex.sparse || []) {
    if (q >= T || k >= T) continue;
    const o = cell(q) * S + cell(k);
    pooled[o] = Math.max(pooled[o], w);
  }
  for (let o = 0; o < S * S; o++) {
    if (!pooled[o]) continue;
    const t = Math.min(1, Math.max(0, pooled[o])) ** 0.5;
    img.data[o * 4] = Math.round(250 - 242 * t);
    img.data[o * 4 + 1] = Math.round(250 - 202 * t);
    img.data[o * 4 + 2] = Math.round(252 - 145 * t);
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function thumbSVG(ex, x, y, size) {
  const T = Math.max(1, ex.tokens.length);
  const cell = size / T;
  const g = s('g', {}, s('rect', { x, y, width: size, height: size, fill: '#fafafc', stroke: '#ccd' }));
  for (const [q, k, w] of ex.sparse || []) {
    const t = Math.min(1, Math.max(0, w)) ** 0.5;
    g.append(s('rect', { x: x + k * cell, y: y + q * cell, width: cell, height: cell, fill: `rgb(${Math.round(250 - 242 * t)},${Math.round(250 - 202 * t)},${Math.round(252 - 145 * t)})` }));
  }
  return g;
}

export function renderSimilar(el, { payload, ctx, name, metrics }) {
  let alive = true;
  const similar = payload.similar || [];
  const cards = h('div', { class: 'thumb-grid' });
  const loaded = new Map();
  ctx.hooks.thumbnails = 0;

  function card(headName, label, distance) {
    const slot = h('div', { class: 'thumb-slot' }, loading(''));
    const c = h('a', { class: `thumb-card${headName === name ? ' self' : ''}`, href: ctx.href(['head', headName]) },
      h('div', { class: 'thumb-title' }, h('strong', {}, headName), distance !== null ? h('span', { class: 'muted' }, ` · d = ${fmt(distance, 3)}`) : h('span', { class: 'muted' }, ` · ${label}`)),
      slot);
    data.head(headName).then((p) => {
      if (!alive) return;
      const ex = (p.examples || [])[0];
      clear(slot).append(ex ? patternThumbnail(ex) : h('div', { class: 'muted small' }, 'no examples'));
      if (ex) slot.append(h('div', { class: 'muted small' }, `seq ${ex.sequence} · max ${fmt(ex.max_attention, 2)}`));
      loaded.set(headName, ex || null);
      ctx.hooks.thumbnails += ex ? 1 : 0;
    }).catch((err) => { if (alive) clear(slot).append(h('div', { class: 'error-text small' }, err.message)); });
    return c;
  }

  const thumbsSVG = () => {
    const list = [[name, null], ...similar.map((x) => [x.head, x.distance])];
    const per = 6;
    const size = 110;
    const W = per * (size + 20) + 20;
    const rows = Math.ceil(list.length / per);
    const parts = [s('text', { x: 12, y: 20, 'font-size': 14, 'font-weight': 600 }, `Heads similar to ${name}`)];
    list.forEach(([hn, d], i) => {
      const x = 20 + (i % per) * (size + 20);
      const y = 34 + Math.floor(i / per) * (size + 40);
      parts.push(s('text', { x, y: y + 12, 'font-size': 12, 'font-weight': 600 }, d === null ? `${hn} (this head)` : `${hn} · d=${fmt(d, 3)}`));
      const ex = loaded.get(hn);
      if (ex) parts.push(thumbSVG(ex, x, y + 18, size));
    });
    return svgRoot(W, 40 + rows * (size + 40), parts);
  };

  // The precompute writes `similar` from motifs/map.json, so a head without similar heads means
  // a run without a motif map (e.g. one imported from HeadVis): say so instead of requesting a
  // file that is not there.
  if (!similar.length) {
    el.append(h('section', { class: 'panel' },
      h('div', { class: 'panel-head' }, h('h3', {}, 'Similar heads')),
      h('div', { class: 'note no-motif-map' },
        h('strong', {}, 'This run has no motif map'), ', so there are no similar heads or head map to show. ',
        'Runs imported from HeadVis have none; ', h('code', {}, 'headscope precompute'), ' writes one (',
        h('code', {}, 'motifs/map.json'), ').')));
    return { unmount() { alive = false; } };
  }
  cards.append(card(name, 'this head', null));
  for (const sim of similar) cards.append(card(sim.head, '', sim.distance));

  const mapBox = h('div', { class: 'panel' }, loading('Loading head map…'));
  el.append(
    h('section', { class: 'panel' },
      h('div', { class: 'panel-head' }, h('h3', {}, 'Nearest heads'), h('span', { class: 'muted small' }, 'by distance between pattern-motif embeddings; thumbnails show each head’s top example (query ↓, key →)'), h('span', { class: 'grow' }),
        exportButtons(`${name}_similar`, { svg: thumbsSVG })),
      cards),
    mapBox);
  const across = renderAcross(el, { ctx, name });

  let plot = null;
  let map = null;
  let mapControls = null;

  function mapSettings(c) {
    const kinds = Object.keys(map).filter((k) => Array.isArray(map[k]) && Array.isArray(map[k][0]) && map[k].length === map.heads.length);
    const kind = kinds.includes(c.get('map')) ? c.get('map') : kinds.includes('tsne') ? 'tsne' : kinds[0];
    const cols = ['layer', 'head', ...metrics.metricNames];
    const mc = cols.includes(c.get('mc')) ? c.get('mc') : 'layer';
    return { kinds, kind, cols, mc };
  }

  function drawMap(c) {
    const st = mapSettings(c);
    mapControls.kind.value = st.kind;
    mapControls.mc.value = st.mc;
    const coords = map[st.kind];
    const col = metrics.col(st.mc);
    const vals = map.heads.map((hn) => (metrics.index.has(hn) ? col[metrics.index.get(hn)] : NaN));
    const fin = vals.filter(Number.isFinite);
    const lo = fin.length ? Math.min(...fin) : 0;
    const hi = fin.length ? Math.max(...fin) : 1;
    const self = map.heads.indexOf(name);
    const near = new Set(similar.map((x) => map.heads.indexOf(x.head)).filter((i) => i >= 0));
    const order = [...map.heads.keys()].sort((a, b) => (a === self) - (b === self) || near.has(a) - near.has(b));
    plot.setData({
      x: coords.map((p) => p[0]), y: coords.map((p) => p[1]),
      colors: vals.map((v) => (Number.isFinite(v) ? viridis((v - lo) / (hi - lo || 1)) : '#ccc')),
      order, emphasis: new Set(self >= 0 ? [self] : []),
      xLabel: `${st.kind} 1`, yLabel: `${st.kind} 2`,
      colorBar: { scale: viridis, lo, hi: hi > lo ? hi : lo + 1, label: st.mc.replace(/_/g, ' ') },
      labels: map.heads,
    });
    plot.setHover(-1, true, [...near]);
    ctx.hooks.mapCount = map.heads.length;
    ctx.hooks.mapPositions = () => plot.clientPositions().map(([x, y], i) => ({ name: map.heads[i], x, y }));
  }

  data.motifMap().then((mp) => {
    if (!alive) return;
    map = mp;
    const st = mapSettings(ctx);
    const kind = select(st.kinds.map((k) => [k, k]), st.kind, (v) => ctx.set({ map: v }, { replace: true }), { id: 'map-kind', 'aria-label': 'map type' });
    const mc = select(st.cols.map((k) => [k, k.replace(/_/g, ' '), metrics.docs[k] || '']), st.mc, (v) => ctx.set({ mc: v }, { replace: true }), { id: 'map-color', 'aria-label': 'map colour' });
    mapControls = { kind, mc };
    const width = Math.max(520, Math.min(900, el.clientWidth - 30));
    plot = new ScatterPlot({
      width, height: Math.round(width * 0.62), ariaLabel: 'map of heads',
      onHover: (i, ev) => {
        if (i < 0) { hideTip(); return; }
        const hn = map.heads[i];
        const j = metrics.index.get(hn);
        const cur = mapSettings(ctx).mc;
        showTip([h('div', { class: 'tip-title' }, hn), j !== undefined ? h('div', {}, `${cur.replace(/_/g, ' ')} ${fmt(metrics.col(cur)[j])}`) : null, h('div', { class: 'muted small' }, 'click to open')], ev.clientX, ev.clientY);
      },
      onClick: (i) => ctx.go(['head', map.heads[i]]),
    });
    clear(mapBox).append(
      h('div', { class: 'panel-head' }, h('h3', {}, 'Head map'), h('span', { class: 'muted small' }, `${name} has a black outline; its nearest heads are ringed in orange`),
        h('span', { class: 'grow' }), h('label', {}, 'map ', kind), h('label', {}, 'colour ', mc),
        exportButtons(`head_map_${name}`, { svg: () => plot.toSVG(`Head map (${mapSettings(ctx).kind})`), png: () => plot.canvas })),
      plot.el);
    drawMap(ctx);
  }).catch((err) => { if (alive) clear(mapBox).append(errorBox(err)); });

  return {
    update(c) {
      ctx = c;
      if (plot && map) drawMap(c);
      across.update(c);
    },
    unmount() {
      alive = false;
      across.unmount();
      hideTip();
    },
  };
}
