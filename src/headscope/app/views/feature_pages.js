// Feature pages of the attention-features area: an MTC feature (its head loadings, where it is
// read: source positions, and where it is moved to: destinations with the source that sent it)
// and a QK feature (its strongest (query, key) pairs in context, its query-side and key-side
// tokens). Data: a decomposition's pages.json (decompose/pages.py), contexts already decoded.

import { h, fmt } from '../lib/dom.js';
import { barChart } from '../lib/svg.js';
import { displayToken, labelToken } from '../lib/tokens.js';
import { categorical } from '../lib/color.js';

/**
 * Tokens `lo..hi` of a context with marked positions (`marks`: position → class, e.g.
 * 'mk-src'); '…' where the window is cut.
 */
export function snippet(strs, marks, lo, hi) {
  const a = Math.max(0, lo);
  const b = Math.min(strs.length - 1, hi);
  const spans = [];
  if (a > 0) spans.push(h('span', { class: 'muted' }, '… '));
  for (let i = a; i <= b; i++) {
    const d = displayToken(strs[i]);
    spans.push(h('span', { class: `tok ${d.cls || ''} ${marks[i] || ''}`, title: `position ${i}` }, d.text.replace(/\n/g, '↵')));
  }
  if (b < strs.length - 1) spans.push(h('span', { class: 'muted' }, ' …'));
  return h('div', { class: 'tokens snippet' }, spans);
}

/** One window around two positions, or two windows joined by '…' when they are far apart. */
function pairSnippet(strs, first, second, marks, pad = 6) {
  if (second - first <= 2 * pad + 8) return snippet(strs, marks, first - pad, second + 2);
  return h('div', { class: 'pair-snippets' }, snippet(strs, marks, first - pad, first + pad), snippet(strs, marks, second - pad, second + 2));
}

function featureList(items, current, href, label) {
  return h('nav', { class: 'feature-list', 'aria-label': 'features' },
    h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', {}, 'feature'), h('th', { class: 'num', title: 'share of the decomposition\'s moved activation / score on these sequences' }, 'share'), h('th', {}, ''))),
      h('tbody', {}, items.map((it) => h('tr', { class: it.feature === current ? 'current' : '' },
        h('td', {}, h('a', { href: href(it.feature) }, `#${it.feature}`)),
        h('td', { class: 'num' }, `${(100 * it.share).toFixed(1)}%`),
        h('td', { class: 'muted small' }, label(it)))))));
}

// ------------------------------------------------------------------ MTC

export function renderMTC(el, { pages, ctx, head }) {
  const cols = pages.columns;
  const headIdx = head ? cols.indexOf(head) : -1;
  const dominant = (p) => p.loading.indexOf(Math.max(...p.loading));
  const feats = headIdx >= 0 ? pages.features.filter((p) => dominant(p) === headIdx) : pages.features;
  const want = ctx.get('f') !== null ? Number(ctx.get('f')) : (feats[0] ? feats[0].feature : null);
  const page = pages.features.find((p) => p.feature === want);
  const list = featureList(feats, want, (f) => ctx.href(['features'], { d: ctx.get('d'), f, head }), (p) => cols[dominant(p)]);
  const strs = (c) => pages.contexts[c].strs;
  let main;
  if (!page) {
    main = h('p', { class: 'muted' }, head ? `No feature of this MTC loads mostly on ${head}.` : 'No features.');
  } else {
    const load = barChart({
      categories: cols,
      series: [{ name: '|head loading|', values: page.loading, color: categorical(0) }],
      width: Math.min(720, 90 + cols.length * 48), height: 200, yLabel: '|loading|', yDomain: [0, 1],
    });
    main = h('div', { class: 'feature-page', 'data-feature': page.feature },
      h('h2', {}, `MTC feature #${page.feature}`),
      h('p', { class: 'muted' }, `moves ${(100 * page.share).toFixed(1)}% of the activation moved on these sequences · active at ${(100 * page.density).toFixed(1)}% of source positions · mostly through `,
        h('strong', {}, cols[dominant(page)])),
      h('section', { class: 'panel' }, h('h3', {}, 'Head loadings'), load,
        h('p', { class: 'muted small' }, 'How the feature is moved: the weights of the layer\'s attention patterns (and, last, the identity: it stays where it is read) in its head-loading vector.')),
      h('div', { class: 'two-col' },
        h('section', { class: 'panel mtc-sources' }, h('h3', {}, 'Source examples'),
          h('p', { class: 'muted small' }, 'Where the encoder reads it (largest activations), marked.'),
          page.sources.map((x) => h('div', { class: 'fx' },
            h('div', { class: 'fx-head' }, h('strong', {}, fmt(x.value, 3)), h('span', { class: 'muted' }, ` · sequence ${pages.contexts[x.context].sequence} · position ${x.position} `), h('code', {}, labelToken(strs(x.context)[x.position]))),
            snippet(strs(x.context), { [x.position]: 'mk-src' }, x.position - 8, x.position + 3)))),
        h('section', { class: 'panel mtc-destinations' }, h('h3', {}, 'Destination examples'),
          h('p', { class: 'muted small' }, 'Where it is moved to (largest moved activations), with the source that sent most of it.'),
          page.destinations.map((x) => h('div', { class: 'fx' },
            h('div', { class: 'fx-head' }, h('strong', {}, fmt(x.value, 3)), h('span', { class: 'muted' }, ` · sequence ${pages.contexts[x.context].sequence} · `),
              h('code', {}, labelToken(strs(x.context)[x.source])), h('span', { class: 'muted' }, ` (${x.source}) → `), h('code', {}, labelToken(strs(x.context)[x.position])), h('span', { class: 'muted' }, ` (${x.position})`)),
            pairSnippet(strs(x.context), x.source, x.position, x.source === x.position ? { [x.position]: 'mk-src mk-dst' } : { [x.source]: 'mk-src', [x.position]: 'mk-dst' }))))));
  }
  el.append(h('div', { class: 'feature-layout' }, list, main));
}

// ------------------------------------------------------------------ QK

function tokenTable(rows, what) {
  return h('table', { class: 'data compact' },
    h('thead', {}, h('tr', {}, h('th', {}, what), h('th', { class: 'num' }, 'max activation'), h('th', { class: 'num' }, 'count'))),
    h('tbody', {}, rows.map((t) => h('tr', {}, h('td', { class: 'tokcell' }, labelToken(t.token)), h('td', { class: 'num' }, fmt(t.value, 3)), h('td', { class: 'num' }, t.count)))));
}

export function renderQK(el, { pages, ctx, head }) {
  const rep = pages.report;
  const feats = rep.features;
  const want = ctx.get('f') !== null ? Number(ctx.get('f')) : (feats[0] ? feats[0].feature : null);
  const page = feats.find((p) => p.feature === want);
  const label = (p) => `${labelToken((p.query_tokens[0] || {}).token || '')} → ${labelToken((p.key_tokens[0] || {}).token || '')}`;
  const list = featureList(feats, want, (f) => ctx.href(['features'], { d: ctx.get('d'), f, head }), label);
  const strs = (c) => pages.contexts[c].strs;
  const main = !page ? h('p', { class: 'muted' }, 'No features.') : h('div', { class: 'feature-page', 'data-feature': page.feature },
    h('h2', {}, `QK feature #${page.feature} of ${rep.head}`),
    h('p', { class: 'muted' }, `${(100 * page.share).toFixed(1)}% of the score contributions at attended pairs · query side active at ${(100 * page.query_density).toFixed(1)}% of tokens, key side at ${(100 * page.key_density).toFixed(1)}%`),
    h('section', { class: 'panel qk-pairs' }, h('h3', {}, '(query, key) examples'),
      h('p', { class: 'muted small' }, 'The pairs where this feature adds most to the head\'s score: the key marked orange, the query blue.'),
      page.pairs.map((x) => h('div', { class: 'fx' },
        h('div', { class: 'fx-head' }, h('strong', {}, fmt(x.value, 3)), h('span', { class: 'muted' }, ` · sequence ${pages.contexts[x.context].sequence} · query ${x.query} `),
          h('code', {}, labelToken(x.query_token)), h('span', { class: 'muted' }, ` → key ${x.key} `), h('code', {}, labelToken(x.key_token))),
        pairSnippet(strs(x.context), x.key, x.query, { [x.key]: 'mk-key', [x.query]: x.query === x.key ? 'mk-key mk-query' : 'mk-query' })))),
    h('div', { class: 'two-col' },
      h('section', { class: 'panel' }, h('h3', {}, 'Query-side tokens'), tokenTable(page.query_tokens, 'query token')),
      h('section', { class: 'panel' }, h('h3', {}, 'Key-side tokens'), tokenTable(page.key_tokens, 'key token'))));
  el.append(h('div', { class: 'feature-layout' }, list, main));
}
