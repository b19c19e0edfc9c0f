// Attention features (#/features[?head=L5H3][&d=<folder>&f=<feature>]): the decompositions saved
// in the run's decompose/ folder (multi-token transcoders, QK diagonalisations, head splits;
// listed by decompose/index.json, which `headscope decompose pages RUN` writes) with their
// metrics, and a page per decomposition: MTC and QK features (feature_pages.js), or the head
// split: which sub-head handles each of the head's stored examples, token by token.

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading } from '../lib/dom.js';
import { displayToken, labelToken } from '../lib/tokens.js';
import { categorical } from '../lib/color.js';
import { renderMTC, renderQK } from './feature_pages.js';
import { curvesSection } from './feature_curves.js';

const KIND = { mtc: 'multi-token transcoder', qk: 'QK diagonalisation', split: 'head split' };
const num = (v, d = 3) => (v === null || v === undefined ? '–' : fmt(v, d));

function metricCells(e) {
  const s = e.stats || {};
  if (e.kind === 'mtc') {
    return [`${s.n_features ?? e.config.n_features} features`, `L0 ${num(s.l0)}`, `FVE ${num(s.fve)}`, `dead ${num(s.dead_fraction, 2)}`];
  }
  if (e.kind === 'qk') {
    return [`${s.n_features ?? e.config.n_features} features, rank ${s.rank ?? e.config.rank}`, `L0 pair ${num(s.l0_pair)}`, `KL ${num(s.kl)} (uniform ${num(s.uniform_kl)})`, `top-1 ${num(s.top1)}`];
  }
  return [`k = ${s.k ?? e.config.n_sub}, d_head ${s.d_head ?? e.config.d_head}`, `FVE ${num(s.fve, 4)}`, `handled ${(s.handled || []).map((x) => x.toFixed(2)).join(' / ')}`, ''];
}

function listView(idx, ctx, head) {
  const entries = head ? idx.entries.filter((e) => e.loads_on && e.loads_on[head]) : idx.entries;
  const rows = entries.map((e) => h('tr', { 'data-entry': e.name },
    h('td', {}, h('a', { href: ctx.href(['features'], { d: e.name, head }) }, e.name)),
    h('td', {}, KIND[e.kind] + (e.variant && e.kind === 'mtc' ? ` (${e.variant})` : '')),
    h('td', {}, e.kind === 'mtc' ? `layer ${e.layer}` : e.heads.map((x) => h('a', { href: ctx.href(['head', x]) }, x))),
    h('td', { class: 'small' }, head && e.kind === 'mtc' ? `${e.loads_on[head]} features load mostly on ${head}` : e.kind === 'mtc' ? Object.entries(e.loads_on).sort((a, b) => b[1] - a[1]).slice(0, 3).map(([k, v]) => `${k} ${v}`).join(', ') : ''),
    ...metricCells(e).map((c) => h('td', { class: 'small' }, c))));
  return h('div', {},
    h('p', { class: 'muted' }, `Decompositions of attention layers trained on this run's model ("Progress on Attention", and the head split the HeadVis paper's discussion asks for), shown on ${idx.sequences} of the run's stored example sequences.`,
      head ? [' Showing those that load on ', h('strong', {}, head), ' · ', h('a', { href: ctx.href(['features']) }, 'show all')] : ''),
    entries.length
      ? h('table', { class: 'data features-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'folder'), h('th', {}, 'kind'), h('th', {}, 'heads'), h('th', {}, 'loads on'), h('th', { colspan: 4 }, 'metrics (held-out data of its training)'))),
        h('tbody', {}, rows))
      : h('p', { class: 'note' }, head ? `No decomposition of this run loads on ${head}.` : 'No decomposition folders: only curves.'),
    head ? null : curvesSection(idx));
}

function renderSplit(el, { entry, pages, ctx }) {
  const s = entry.stats || {};
  const k = s.k ?? entry.config.n_sub;
  const legend = h('div', { class: 'split-legend' }, Array.from({ length: k }, (_, i) => h('span', { class: 'swatch-item' },
    h('span', { class: 'swatch', style: { background: categorical(i) } }), `sub-head ${i}`,
    s.handled ? h('span', { class: 'muted' }, ` · handles ${(100 * s.handled[i]).toFixed(0)}% of tokens`) : '')));
  const maxNorm = Math.max(1e-9, ...pages.examples.flatMap((e) => e.norm.slice(1)));
  const cards = pages.examples.map((ex) => {
    const c = pages.contexts[ex.context];
    const toks = c.strs.map((t, i) => {
      const d = displayToken(t);
      const a = i === 0 ? 0 : Math.min(1, 0.15 + 0.85 * Math.sqrt(ex.norm[i] / maxNorm));
      const col = categorical(ex.top[i]);
      return h('span', {
        class: `tok ${d.cls || ''}`, 'data-sub': ex.top[i],
        title: `${i}: ${labelToken(t)} · sub-head ${ex.top[i]} (share ${fmt(ex.share[i], 2)}) · output norm ${fmt(ex.norm[i], 3)}`,
        style: { boxShadow: `inset 0 -3px 0 ${col}`, background: `${col}${Math.round(a * 0x55).toString(16).padStart(2, '0')}` },
      }, d.text);
    });
    return h('article', { class: 'example split-example', 'data-handled': ex.handled_by },
      h('div', { class: 'example-head' }, h('strong', {}, `sequence ${c.sequence}`),
        h('span', { class: 'muted' }, ex.max_attention !== null ? ` · max attention ${fmt(ex.max_attention, 3)}` : ''),
        h('span', {}, ' · handled by '), h('span', { class: 'badge', style: { background: categorical(ex.handled_by), color: '#fff' } }, `sub-head ${ex.handled_by}`),
        h('span', { class: 'muted' }, ` · output shares ${ex.output_share.map((x) => x.toFixed(2)).join(' / ')}`)),
      h('div', { class: 'tokens' }, toks));
  });
  el.append(
    h('p', {}, `${pages.head} split into ${k} heads of dimension ${s.d_head ?? entry.config.d_head}: their summed output explains `,
      h('strong', {}, `${fmt(100 * (s.fve ?? 0), 4)}%`), ' of the head\'s output variance on held-out data, ',
      h('strong', {}, `${fmt(100 * pages.fve, 4)}%`), ' on the run\'s example sequences.'),
    legend,
    h('p', { class: 'muted small' }, `Each of ${pages.head}'s stored examples, every token underlined in the colour of the sub-head with the largest share of the output there (shaded by the output's size).`),
    ...(cards.length ? cards : [h('p', { class: 'note' }, 'The run stores no examples of this head.')]));
}

export function mount(root, ctx) {
  const container = h('div', { class: 'view view-features' }, loading('Loading attention features…'));
  root.append(container);
  let idx = null;

  function draw(c) {
    const head = c.get('head');
    const d = c.get('d');
    clear(container);
    const title = h('div', { class: 'head-title' }, h('h1', {}, 'Attention features'),
      head ? h('a', { class: 'button-link', href: c.href(['head', head]) }, `← ${head}`) : null);
    container.append(title);
    if (!idx) {
      container.append(h('div', { class: 'note' }, 'This run has no attention features. Train some into the run folder with ',
        h('code', {}, 'headscope decompose mtc|qk|split --layer L ... --out RUN/decompose/NAME'), ', then write their pages with ',
        h('code', {}, 'headscope decompose pages RUN'), ' (docs/decompose.md).'));
      c.ready('features');
      return;
    }
    const entry = d ? idx.entries.find((e) => e.name === d) : null;
    if (!entry) {
      if (d) container.append(errorBox(`No decomposition "${d}" in this run.`));
      container.append(listView(idx, c, head));
      c.ready('features');
      return;
    }
    const body = h('div', { class: 'features-body' }, loading('Loading its pages…'));
    container.append(
      h('p', {}, h('a', { href: c.href(['features'], { head }) }, '← all attention features'), ' · ',
        h('strong', {}, entry.name), h('span', { class: 'muted' }, ` · ${KIND[entry.kind]} · ${metricCells(entry).filter(Boolean).join(' · ')}`)),
      body);
    if (!entry.pages) {
      clear(body).append(h('div', { class: 'note' }, 'No pages written for it: run headscope decompose pages RUN.'));
      return;
    }
    data.decomposePages(entry.pages).then((pages) => {
      clear(body);
      if (entry.kind === 'mtc') renderMTC(body, { pages, ctx: c, head });
      else if (entry.kind === 'qk') renderQK(body, { pages, ctx: c, head });
      else renderSplit(body, { entry, pages, ctx: c });
      c.ready(`features:${entry.name}`);
    }).catch((err) => clear(body).append(errorBox(err)));
  }

  data.decomposeIndex().then((x) => {
    idx = x;
    draw(ctx);
  }).catch((err) => clear(container).append(errorBox(err)));

  return {
    update(c) {
      if (idx === null && container.querySelector('.loading')) return false;
      draw(c);
      return true;
    },
  };
}
