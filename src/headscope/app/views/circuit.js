// Circuit diagram (as in the HeadVis paper) for one (query, key) pair: QK on top (query-side
// components at the query token, key-side components at the key token, edges weighted by the
// QK term), OV below (value-side components at the key token → output tokens at the query
// token, edges weighted by the component's value norm). In the feature basis with an output
// dictionary, the OV half joins value features at the key to output features at the query by
// their pair terms, so all four corners (query, key, value, output) are features, as in the
// paper's induction example; feature boxes link to their feature pages. Returns an <svg>.

import { s, svgRoot, fitText } from '../lib/svg.js';
import { describeComponent } from '../lib/components.js';
import { labelToken } from '../lib/tokens.js';
import { fixed } from '../lib/dom.js';
import { featureHref } from './feature.js';

const W = 780;
const BOX_W = 250;
const BOX_H = 40;
const GAP = 12;
const LEFT = 30;
const RIGHT = W - 30 - BOX_W;
const POS = '#b2182b';
const NEG = '#2166ac';

function topBy(list, score, n) {
  return [...list].sort((a, b) => score(b) - score(a)).slice(0, n);
}

function box(x, y, title, sub, fill, stroke) {
  return s('g', {},
    s('rect', { x, y, width: BOX_W, height: BOX_H, rx: 6, fill, stroke, 'stroke-width': 1.2 }),
    s('text', { x: x + 10, y: y + 17, 'font-size': 12, 'font-weight': 600 }, fitText(title, BOX_W - 20, 12)),
    sub ? s('text', { x: x + 10, y: y + 32, 'font-size': 11, fill: '#555b66' }, fitText(sub, BOX_W - 20, 11)) : null,
    s('title', {}, `${title}${sub ? `\n${sub}` : ''}`));
}

/** A box that links to its feature page when `label` is a dictionary feature. */
function linked(ctx, label, el) {
  const href = featureHref(ctx, label);
  return href ? s('a', { href, class: 'circuit-feature', 'data-feature': label }, el) : el;
}

function edge(x1, y1, x2, y2, width, color, title) {
  const mx = (x1 + x2) / 2;
  return s('path', {
    d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
    fill: 'none', stroke: color, 'stroke-width': width.toFixed(2), 'stroke-opacity': 0.7,
  }, s('title', {}, title));
}

/**
 * @param {object} o
 * @param {object|null} o.qk api/attribute/qk result
 * @param {object|null} o.ov api/attribute/ov result
 * @param {object} [o.ctx] router context (feature boxes link to feature pages)
 * @param {number} [o.n] boxes per side
 */
export function circuitDiagram({ qk, ov, ctx = null, n = 4 }) {
  const tokens = (qk && qk.tokens) || (ov && ov.tokens) || [];
  const q = qk ? qk.query : ov ? ov.query : 0;
  const k = qk ? qk.key : ov ? ov.key : 0;
  const features = { ...((ov && ov.features) || {}), ...((qk && qk.features) || {}) };
  const fourCorners = Boolean(ov && ov.pairs && ov.pairs.length);
  const parts = [];
  let y = 20;
  parts.push(s('text', { x: LEFT, y, 'font-size': 12, fill: '#7f2704', 'font-weight': 600 }, `key · position ${k} · “${labelToken(tokens[k] ?? '')}”`));
  parts.push(s('text', { x: RIGHT, y, 'font-size': 12, fill: '#08306b', 'font-weight': 600 }, `query · position ${q} · “${labelToken(tokens[q] ?? '')}”`));
  y += 16;

  if (qk && qk.terms && qk.terms.length) {
    const terms = qk.terms.slice(0, 200);
    const qm = new Map();
    const km = new Map();
    for (const t of terms) {
      qm.set(t.query, (qm.get(t.query) || 0) + Math.abs(t.value));
      km.set(t.key, (km.get(t.key) || 0) + Math.abs(t.value));
    }
    const qs = topBy([...qm.keys()], (c) => qm.get(c), n);
    const ks = topBy([...km.keys()], (c) => km.get(c), n);
    const rows = Math.max(qs.length, ks.length);
    y += 16;
    parts.push(s('text', { x: W / 2, y, 'text-anchor': 'middle', 'font-size': 13, 'font-weight': 600 }, `QK circuit · score ${fixed(qk.score)}`));
    y += 12;
    const top = y;
    const qy = new Map(qs.map((c, i) => [c, top + i * (BOX_H + GAP)]));
    const ky = new Map(ks.map((c, i) => [c, top + i * (BOX_H + GAP)]));
    const shown = terms.filter((t) => qy.has(t.query) && ky.has(t.key));
    const maxAbs = Math.max(1e-9, ...shown.map((t) => Math.abs(t.value)));
    for (const t of shown.slice().sort((a, b) => Math.abs(a.value) - Math.abs(b.value))) {
      if (Math.abs(t.value) < maxAbs * 0.02) continue;
      parts.push(edge(LEFT + BOX_W, ky.get(t.key) + BOX_H / 2, RIGHT, qy.get(t.query) + BOX_H / 2,
        1 + 9 * (Math.abs(t.value) / maxAbs), t.value >= 0 ? POS : NEG,
        `${t.query} × ${t.key}: ${t.value.toFixed(4)}`));
    }
    for (const c of ks) {
      const d = describeComponent(c, features);
      parts.push(linked(ctx, c, box(LEFT, ky.get(c), d.text, `key ${d.kind === 'feature' ? 'feature' : 'side'} · Σ|terms| ${km.get(c).toFixed(3)}`, '#fff3e6', '#f16913')));
    }
    for (const c of qs) {
      const d = describeComponent(c, features);
      parts.push(linked(ctx, c, box(RIGHT, qy.get(c), d.text, `query ${d.kind === 'feature' ? 'feature' : 'side'} · Σ|terms| ${qm.get(c).toFixed(3)}`, '#eaf2fb', '#4292c6')));
    }
    y = top + rows * (BOX_H + GAP) + 10;
  }

  if (fourCorners) {
    const pairs = ov.pairs.slice(0, 200);
    const vm = new Map();
    const om = new Map();
    for (const t of pairs) {
      vm.set(t.value_feature, (vm.get(t.value_feature) || 0) + Math.abs(t.value));
      om.set(t.output_feature, (om.get(t.output_feature) || 0) + Math.abs(t.value));
    }
    const vs = topBy([...vm.keys()], (c) => vm.get(c), n);
    const os = topBy([...om.keys()], (c) => om.get(c), n);
    const rows = Math.max(vs.length, os.length);
    y += 20;
    parts.push(s('text', { x: W / 2, y, 'text-anchor': 'middle', 'font-size': 13, 'font-weight': 600 },
      `OV circuit · attention ${fixed(ov.attention, 3)} · output read by ${ov.output_dictionary}`));
    y += 12;
    const top = y;
    const vy = new Map(vs.map((c, i) => [c, top + i * (BOX_H + GAP)]));
    const oy = new Map(os.map((c, i) => [c, top + i * (BOX_H + GAP)]));
    const shown = pairs.filter((t) => vy.has(t.value_feature) && oy.has(t.output_feature));
    const maxAbs = Math.max(1e-9, ...shown.map((t) => Math.abs(t.value)));
    for (const t of shown.slice().sort((a, b) => Math.abs(a.value) - Math.abs(b.value))) {
      if (Math.abs(t.value) < maxAbs * 0.02) continue;
      parts.push(edge(LEFT + BOX_W, vy.get(t.value_feature) + BOX_H / 2, RIGHT, oy.get(t.output_feature) + BOX_H / 2,
        1 + 9 * (Math.abs(t.value) / maxAbs), t.value >= 0 ? POS : NEG,
        `${t.value_feature} → ${t.output_feature}: ${t.value.toFixed(4)}`));
    }
    for (const c of vs) {
      const d = describeComponent(c, features);
      parts.push(linked(ctx, c, box(LEFT, vy.get(c), d.text, `value ${d.kind === 'feature' ? 'feature' : 'side'} · Σ|terms| ${vm.get(c).toFixed(3)}`, '#fff3e6', '#f16913')));
    }
    for (const c of os) {
      const d = describeComponent(c, features);
      parts.push(linked(ctx, c, box(RIGHT, oy.get(c), d.text, `output feature · Σ|terms| ${om.get(c).toFixed(3)}`, '#eaf2fb', '#4292c6')));
    }
    y = top + rows * (BOX_H + GAP) + 6;
  } else if (ov && ov.terms && ov.terms.length) {
    const vs = topBy(ov.terms, (t) => t.value_norm, n);
    const outs = (ov.promoted || []).slice(0, n);
    const rows = Math.max(vs.length, outs.length);
    y += 20;
    parts.push(s('text', { x: W / 2, y, 'text-anchor': 'middle', 'font-size': 13, 'font-weight': 600 }, `OV circuit · attention ${fixed(ov.attention, 3)}`));
    y += 12;
    const top = y;
    const oy = new Map(outs.map((o, i) => [o.token, top + i * (BOX_H + GAP)]));
    const maxN = Math.max(1e-9, ...vs.map((t) => t.value_norm));
    let nEdges = 0;
    vs.forEach((t, i) => {
      const vy = top + i * (BOX_H + GAP);
      const tops = (t.logit_top || []).map((x) => (typeof x === 'string' ? x : x.token));
      // An edge joins a value component to an output token it promotes itself (its logit_top).
      for (const tok of tops.filter((x) => oy.has(x))) {
        parts.push(edge(LEFT + BOX_W, vy + BOX_H / 2, RIGHT, oy.get(tok) + BOX_H / 2, 1 + 8 * (t.value_norm / maxN), '#6a51a3', `${t.component} → “${labelToken(tok)}”`));
        nEdges++;
      }
      const d = describeComponent(t.component, features);
      const own = tops.slice(0, 3).map((x) => `“${labelToken(x)}”`).join(' ');
      parts.push(box(LEFT, vy, d.text, `value side · ‖v‖ ${t.value_norm.toFixed(3)}${own ? ` · ${own}` : ''}`, '#fff3e6', '#f16913'));
    });
    if (!nEdges) {
      parts.push(s('text', { x: W / 2, y: top + rows * (BOX_H + GAP) + 8, 'text-anchor': 'middle', 'font-size': 11, fill: '#555b66' },
        'no edges: none of these components’ own top logits is among the head’s top promoted tokens'));
    }
    outs.forEach((o, i) => {
      parts.push(box(RIGHT, top + i * (BOX_H + GAP), `say “${labelToken(o.token)}”`, `output · logit ${Number(o.logit).toFixed(3)}`, '#eaf2fb', '#4292c6'));
    });
    y = Math.max(y, top + rows * (BOX_H + GAP) + 6 + (nEdges ? 0 : 14));
  }
  if (y < 80) parts.push(s('text', { x: W / 2, y: 70, 'text-anchor': 'middle', fill: '#555b66' }, 'no attribution terms to draw'));
  return svgRoot(W, Math.max(90, y + 10), parts);
}
