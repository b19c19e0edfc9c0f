// Feature page (#/feature/L16/123[?n=tokens]): one residual dictionary feature, from the live server's
// `feature` operation (on the served run's data, else the default corpus; the page names which,
// and how many tokens): its label, top contexts (tokens shaded by the feature's activation), an
// activation histogram, the heads that read it on the query and key side and the earlier heads
// that write it, and its nearest features by virtual weight through its top readers.

import * as data from '../data.js';
import { h, clear, fmt, fixed, errorBox, loading, needsServer } from '../lib/dom.js';
import { s, svgRoot } from '../lib/svg.js';
import { labelToken } from '../lib/tokens.js';
import { edgeGraphHref } from './edge_graph.js';

/** '#/feature/L16/123' for a feature label 'sae:L16/123' (null for other labels). */
export function featureHref(ctx, label) {
  const m = String(label).match(/^sae:L(\d+)\/(\d+)$/);
  return m && ctx ? ctx.href(['feature', `L${m[1]}`, m[2]]) : null;
}

function parseId(parts) {
  const layer = Number(String(parts[1] || '').replace(/^L/i, ''));
  const index = Number(parts[2]);
  return Number.isInteger(layer) && Number.isInteger(index) && layer >= 0 && index >= 0 ? { layer, index } : null;
}

function histogram(hist) {
  const W = 420;
  const H = 150;
  const pad = { l: 40, r: 10, t: 10, b: 30 };
  const counts = hist.counts || [];
  const edges = hist.edges || [];
  const mx = Math.max(1, ...counts);
  const bw = (W - pad.l - pad.r) / Math.max(1, counts.length);
  const y = (c) => pad.t + (H - pad.t - pad.b) * (1 - Math.log1p(c) / Math.log1p(mx));
  const parts = counts.map((c, i) => s('rect', {
    class: 'hist-bar',
    x: pad.l + i * bw + 0.5, y: y(c), width: Math.max(0.5, bw - 1), height: H - pad.b - y(c), fill: '#6a51a3',
  }, s('title', {}, `${fixed(edges[i], 3)} – ${fixed(edges[i + 1], 3)}: ${c} tokens`)));
  parts.push(s('line', { x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b, stroke: '#999' }));
  parts.push(s('text', { x: pad.l, y: H - 10, 'font-size': 11 }, '0'));
  parts.push(s('text', { x: W - pad.r, y: H - 10, 'font-size': 11, 'text-anchor': 'end' }, fixed(edges[edges.length - 1] ?? 0, 2)));
  parts.push(s('text', { x: (W + pad.l) / 2, y: H - 2, 'font-size': 11, 'text-anchor': 'middle', fill: '#555b66' }, 'activation (where it fires)'));
  parts.push(s('text', { x: 4, y: pad.t + 8, 'font-size': 11, fill: '#555b66' }, `${mx}`));
  parts.push(s('text', { x: 4, y: H - pad.b, 'font-size': 11, fill: '#555b66' }, 'log'));
  return svgRoot(W, H, parts);
}

function contextRow(c, maxAct, edges = null) {
  const spans = c.tokens.map((t, i) => {
    const a = c.acts[i] || 0;
    const alpha = Math.min(1, a / (maxAct || 1));
    return h('span', {
      class: `ctx-tok${i === c.at ? ' ctx-at' : ''}`,
      title: `activation ${fixed(a, 3)}`,
      style: { background: a > 0 ? `rgba(106, 81, 163, ${(0.15 + 0.7 * alpha).toFixed(2)})` : 'transparent' },
    }, labelToken(t));
  });
  return h('tr', {}, h('td', { class: 'num' }, fixed(c.activation, 3)), h('td', { class: 'ctx' }, spans),
    edges ? h('td', {}, h('a', {
      class: 'small edge-graph-link', href: edges(c), title: 'the attention-mediated edges into this feature at this token (live)',
    }, 'edges')) : null);
}

function headTable(rows, ctx, title, what, value) {
  return h('div', { class: 'marg' }, h('h4', {}, title), h('p', { class: 'muted small' }, what),
    h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', {}, 'head'), h('th', { class: 'num' }, value.name))),
      h('tbody', {}, rows.map((r) => h('tr', {}, h('td', {}, h('a', { href: ctx.href(['head', r.head]) }, r.head)),
        h('td', { class: 'num' }, value.fmt(r)))))));
}

function nearTable(vw, ctx) {
  const other = vw.side === 'key' ? 'query' : 'key';
  const list = (rows, caption) => h('div', {}, h('p', { class: 'muted small' }, caption), h('table', { class: 'data compact' },
    h('thead', {}, h('tr', {}, h('th', { class: 'num' }, 'cosine'), h('th', {}, 'feature'))),
    h('tbody', {}, rows.map((r) => h('tr', {}, h('td', { class: 'num' }, fixed(r.cosine, 3)),
      h('td', {}, h('a', { href: featureHref(ctx, r.feature) || '#' }, r.feature), r.label ? h('span', { class: 'muted' }, ` · ${r.label}`) : null))))));
  return h('div', { class: 'marg near' },
    h('h4', {}, `Through ${vw.head}’s ${vw.side} projection`),
    list(vw.same_side, `same side: features whose ${vw.side} projections point the same way (the head can hardly tell them apart as ${vw.side === 'query' ? 'queries' : 'keys'})`),
    list(vw.other_side, `other side: ${other}-side features this ${vw.side} matches (a high score when they meet)`));
}

/** The tokens the feature fires on most often among the page's own top contexts. */
function firesOn(contexts, n = 5) {
  const count = new Map();
  for (const c of contexts) count.set(c.tokens[c.at], (count.get(c.tokens[c.at]) || 0) + 1);
  return [...count.keys()].sort((a, b) => count.get(b) - count.get(a)).slice(0, n).map((t) => `“${labelToken(t)}”`).join(' ');
}

function render(el, f, ctx) {
  // the context up to the activating token, its last token the target
  const edges = (c) => edgeGraphHref(ctx, { text: c.tokens.slice(0, c.at + 1).join(''), layer: f.layer, feature: f.index, pos: -1 });
  const maxAct = Math.max(1e-9, ...f.contexts.map((c) => c.activation));
  const card = f.card || {};
  clear(el).append(
    h('h1', {}, `Feature ${f.feature}`),
    h('p', { class: 'feature-label', title: 'from its card (features.json), measured when the dictionary was labelled' },
      f.label ? f.label : h('span', { class: 'muted' }, 'no card for this feature (features.json)')),
    f.contexts.length ? h('p', { class: 'small fires-here' }, `on this page’s text it fires most on ${firesOn(f.contexts)}`) : null,
    h('p', { class: 'muted small' },
      `fires on ${fmt(100 * f.density, 3)}% of ${f.n_tokens.toLocaleString('en-US')} tokens · mean activation ${fixed(f.mean_activation, 3)} · `,
      h('span', { class: 'feature-data', title: f.data }, `text: ${f.data_name || f.data.split('/').pop()}${f.skipped_sequences ? ` after the ${f.skipped_sequences} sequences the dictionary trained on` : ''}`), ' · ',
      `${f.n_features} features in layer ${f.layer}’s dictionary`),
    h('div', { class: 'attr-grid feature-top' },
      h('section', { class: 'panel feature-contexts' }, h('h3', {}, 'Top activating contexts'),
        f.contexts.length ? h('table', { class: 'data compact' }, h('tbody', {}, f.contexts.map((c) => contextRow(c, maxAct, f.layer > 0 ? edges : null))))
          : h('p', { class: 'muted' }, 'it does not fire on this text')),
      h('section', { class: 'panel feature-hist' }, h('h3', {}, 'Activation histogram'), histogram(f.histogram),
        card.promoted && card.promoted.length ? [h('h4', {}, 'Promoted tokens'), h('div', {}, card.promoted.map((t) => h('span', { class: 'chip' }, labelToken(t))))] : null)),
    h('section', { class: 'panel feature-heads' }, h('h3', {}, 'Heads'),
      h('div', { class: 'attr-grid' },
        headTable(f.query_readers, ctx, 'Read on the query side', 'share of the head’s query vector this feature contributes where it fires most (frozen norm, through W_Q)', { name: 'share', fmt: (r) => `${fmt(100 * r.share, 3)}%` }),
        headTable(f.key_readers, ctx, 'Read on the key side', 'share of the head’s key vector this feature contributes where it fires most (frozen norm, through W_K)', { name: 'share', fmt: (r) => `${fmt(100 * r.share, 3)}%` }),
        f.writers.length
          ? headTable(f.writers, ctx, 'Written by', 'earlier heads’ direct effect (OV output read by the feature’s encoder) on its pre-activation where it fires most', { name: 'effect', fmt: (r) => `${fixed(r.value, 3)} (${fmt(100 * r.share, 3)}%)` })
          : h('div', { class: 'marg' }, h('h4', {}, 'Written by'), h('p', { class: 'muted small' }, 'no earlier head writes it (layer 0)')))),
    h('section', { class: 'panel feature-near' }, h('h3', {}, 'Nearest features by virtual weight'),
      h('div', { class: 'attr-grid' }, f.near.map((vw) => nearTable(vw, ctx)))),
  );
}

export function mount(root, ctx) {
  let alive = true;
  const el = h('div', { class: 'view view-feature' }, loading('Loading the feature…'));
  root.append(el);
  const id = parseId(ctx.parts);
  if (!id) {
    clear(el).append(errorBox(`Not a feature id: ${ctx.parts.slice(1).join('/')} (expected e.g. #/feature/L16/123)`));
    ctx.ready('feature');
    return { unmount() {} };
  }
  data.liveStatus().then(async (st) => {
    if (!alive) return;
    if (!st.live) {
      clear(el).append(h('h1', {}, `Feature L${id.layer}/${id.index}`), needsServer('A feature page', st.server));
      ctx.ready('feature');
      return;
    }
    clear(el).append(loading(`Reading feature L${id.layer}/${id.index} (the first page of a layer streams its text once)…`));
    try {
      const n = Number(ctx.get('n'));
      const req = { layer: id.layer, feature: id.index, ...(Number.isInteger(n) && n > 0 ? { n_tokens: n } : {}) };
      const f = await data.api.feature(req);
      if (!alive) return;
      render(el, f, ctx);
    } catch (err) {
      if (alive) clear(el).append(h('h1', {}, `Feature L${id.layer}/${id.index}`), errorBox(err));
    }
    ctx.ready('feature');
  });
  return { unmount() { alive = false; } };
}
