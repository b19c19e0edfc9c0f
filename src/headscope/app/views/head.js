// Head page (#/head/L5H3[/pca|/similar]): metrics with their explanations, the max-attention
// histogram, top query/key tokens, curves, and the tabs: dataset examples grouped by decile
// bucket (the central HeadVis view), PCA of Q/K/O, and similar heads. State in the URL:
// color=key, ex (example index), q, k (the selected pair), basis.

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, typingTarget } from '../lib/dom.js';
import { blues, oranges, gradient } from '../lib/color.js';
import { histogram, lineChart, zeroDomain } from '../lib/svg.js';
import { TokenView, labelToken } from '../lib/tokens.js';
import { exportButtons } from '../lib/export.js';
import { hideTip } from '../lib/tooltip.js';
import { renderPCA } from './pca.js';
import { renderSimilar } from './similar.js';
import { renderAttribution } from './attribution.js';
import { renderDescribe } from './describe.js';
import { renderKnockout } from './knockout.js';
import { zsaePanel } from './zsae.js';

const TABS = [['', 'Examples'], ['pca', 'PCA'], ['similar', 'Similar heads'], ['describe', 'Describe'], ['knockout', 'Knockout']];
const label = (c) => c.replace(/_/g, ' ');

function intParam(ctx, name) {
  const v = ctx.get(name);
  if (v === null || v === '') return null;
  const n = Number.parseInt(v, 10);
  return Number.isFinite(n) ? n : null;
}

export function mount(root, ctx) {
  const name = ctx.parts[1];
  const container = h('div', { class: 'view view-head' }, loading(`Loading ${name}…`));
  root.append(container);
  let payload = null;
  let m = null;
  let tabEl = null;
  let tabInstance = null;
  let tabName = null;
  let tabsNav = null;
  let layout = null;

  function renderTab(c) {
    const t = c.parts[2] || '';
    if (t === tabName && tabInstance && tabInstance.update) { tabInstance.update(c); return; }
    if (tabInstance && tabInstance.unmount) tabInstance.unmount();
    tabName = t;
    for (const a of tabsNav.querySelectorAll('a')) {
      if (a.dataset.tab === t) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    clear(tabEl);
    // PCA and the head map need the width; the overview column stays on the examples tab.
    layout.classList.toggle('wide', t !== '');
    if (t === 'pca') tabInstance = renderPCA(tabEl, { payload, ctx: c, name });
    else if (t === 'similar') tabInstance = renderSimilar(tabEl, { payload, ctx: c, name, metrics: m });
    else if (t === 'describe') tabInstance = renderDescribe(tabEl, { payload, ctx: c, name });
    else if (t === 'knockout') tabInstance = renderKnockout(tabEl, { payload, ctx: c, name });
    else tabInstance = renderExamples(tabEl, { payload, ctx: c, name });
  }

  Promise.all([data.head(name), data.metrics()]).then(([p, metrics]) => {
    payload = p;
    m = metrics;
    const idx = m.index.get(name);
    const prev = idx > 0 ? m.names[idx - 1] : null;
    const next = idx !== undefined && idx < m.names.length - 1 ? m.names[idx + 1] : null;
    tabsNav = h('nav', { class: 'tabs', 'aria-label': 'head page sections' },
      TABS.map(([t, lab]) => h('a', { href: ctx.href(t ? ['head', name, t] : ['head', name]), 'data-tab': t }, lab)));
    tabEl = h('div', { class: 'tab-body' });
    layout = h('div', { class: 'head-layout' }, overview(p, m, name), h('div', { class: 'head-main' }, tabEl));
    clear(container).append(
      h('div', { class: 'head-title' },
        h('a', { class: 'back', href: ctx.href(['heads']) }, '← all heads'),
        h('h1', {}, name),
        h('span', { class: 'muted' }, `layer ${p.layer} · head ${p.index}`),
        featuresLink(ctx, name),
        h('span', { class: 'grow' }),
        prev ? h('a', { class: 'button-link', href: ctx.href(['head', prev, ...(ctx.parts[2] ? [ctx.parts[2]] : [])]), title: 'previous head' }, `‹ ${prev}`) : null,
        next ? h('a', { class: 'button-link', href: ctx.href(['head', next, ...(ctx.parts[2] ? [ctx.parts[2]] : [])]), title: 'next head' }, `${next} ›`) : null),
      tabsNav,
      layout);
    renderTab(ctx);
    ctx.ready(`head:${name}`);
  }).catch((err) => clear(container).append(errorBox(err), h('p', {}, h('a', { href: ctx.href(['heads']) }, 'Back to the head selector'))));

  return {
    update(c) {
      if (!payload) return false;
      ctx = c;
      renderTab(c);
      return true;
    },
    unmount() {
      if (tabInstance && tabInstance.unmount) tabInstance.unmount();
      hideTip();
    },
  };
}

/** "attention features" link: the run's MTCs / QK dictionaries / splits that load on this head. */
function featuresLink(ctx, name) {
  const slot = h('span', { class: 'features-link' });
  data.decomposeIndex().then((idx) => {
    const on = (idx ? idx.entries : []).filter((e) => e.loads_on && e.loads_on[name]);
    if (!on.length) return;
    const n = on.reduce((a, e) => a + (e.kind === 'mtc' ? e.loads_on[name] : 0), 0);
    const kinds = [...new Set(on.map((e) => ({ mtc: 'MTC', qk: 'QK', split: 'split' })[e.kind]))].join(', ');
    slot.append(h('a', { class: 'button-link', href: ctx.href(['features'], { head: name }),
      title: `decompositions of the run that load on ${name}${n ? ` (${n} MTC features whose largest loading is this head)` : ''}` },
    `attention features: ${kinds}`));
  }).catch(() => {});
  return slot;
}

/** The left column: metrics (+ rank among all heads), histogram, curves, top tokens. */
function overview(p, m, name) {
  const i = m.index.get(name);
  const metricRows = Object.entries(p.metrics || {}).map(([k, v]) => {
    let rank = null;
    if (i !== undefined && m.has(k) && Number.isFinite(v)) {
      const col = m.col(k);
      let below = 0;
      for (let j = 0; j < col.length; j++) if (col[j] < v) below++;
      rank = below / Math.max(1, col.length - 1);
    }
    return h('tr', {},
      h('td', {}, h('div', { class: 'metric-name' }, label(k)), m.docs[k] ? h('div', { class: 'metric-doc' }, m.docs[k]) : null),
      h('td', { class: 'num' }, fmt(v), m.levels[k] && m.levels[k][String(v)] ? h('div', { class: 'metric-level' }, m.levels[k][String(v)]) : null),
      h('td', { class: 'rank', title: rank === null ? '' : `higher than ${Math.round(rank * 100)}% of heads` },
        rank === null ? '' : h('div', { class: 'rankcell' },
          h('div', { class: 'rankbar', 'aria-hidden': 'true' }, h('div', { style: { width: `${Math.round(rank * 100)}%` } })),
          h('span', { class: 'rank-num' }, `${Math.round(rank * 100)}%`))));
  });
  const section = (title, body, exp) => h('section', { class: 'panel' }, h('div', { class: 'panel-head' }, h('h3', {}, title), exp || null), body);
  const hist = p.histogram && p.histogram.counts
    ? () => histogram({ edges: p.histogram.edges, counts: p.histogram.counts, width: 330, height: 170, xLabel: 'max attention in the sequence' })
    : null;
  const curves = Object.entries(p.curves || {});
  // A logit attribution can be negative: the y axis spans the data and 0 (a zero line when the
  // values go below it), not 0 upwards.
  const curveSvg = (cname, ys) => lineChart({
    series: [{ name: label(cname), x: ys.map((_, j) => j + 1), y: ys, color: '#b63b04' }],
    width: 330, height: 160, xLabel: 'prefix length', xTicks: ys.map((_, j) => j + 1),
    yLabel: /dla/.test(cname) ? 'logit' : /attention|induction/.test(cname) ? 'attention' : '',
    yDomain: zeroDomain(ys),
  });
  const tokTable = (rows, what, massDoc) => h('div', { class: 'table-scroll short' }, h('table', { class: 'data compact' },
    h('thead', {}, h('tr', {}, h('th', {}, what), h('th', { class: 'num', title: massDoc }, 'mass'), h('th', { class: 'num', title: 'occurrences in the run' }, 'count'))),
    h('tbody', {}, (rows || []).map((r) => h('tr', {}, h('td', { class: 'tokcell' }, labelToken(r.token)), h('td', { class: 'num' }, fmt(r.mass, 3)), h('td', { class: 'num' }, r.count))))));
  return h('aside', { class: 'head-overview' },
    section('Metrics', h('table', { class: 'data metrics' },
      h('thead', {}, h('tr', {}, h('th', {}, 'metric'), h('th', { class: 'num' }, 'value'), h('th', { title: 'percentile among all heads: the share of heads with a lower value' }, 'rank'))), h('tbody', {}, metricRows))),
    hist ? section('Max attention per sequence', hist(), exportButtons(`${name}_histogram`, { svg: hist })) : null,
    curves.map(([cname, ys]) => section(label(cname), curveSvg(cname, ys), exportButtons(`${name}_${cname}`, { svg: () => curveSvg(cname, ys) }))),
    section('Top tokens', h('div', {},
      h('h4', {}, 'as query'), tokTable(p.top_query_tokens, 'query token', 'mean attention the token pays to anything but the first position'),
      h('h4', {}, 'as key'), tokTable(p.top_key_tokens, 'key token', 'mean total attention the token receives from later queries (can exceed 1)'))),
    zsaePanel(p.zsae));
}

// Examples longer than this many tokens (long-context runs) show only the spans around their
// strongest (query, key) pairs; each run of hidden tokens is a button that expands it.
const LONG_EXAMPLE = 1024;
const SPAN_CONTEXT = 12; // tokens kept on each side of an attended query or key
const SPAN_PAIRS = 16; // strongest pairs (key 0 aside) whose spans stay open

function collapseLong(tv, ex) {
  const n = tv.spans.length;
  if (n <= LONG_EXAMPLE) return;
  const keep = new Uint8Array(n);
  const open = (c) => keep.fill(1, Math.max(0, c - SPAN_CONTEXT), Math.min(n, c + SPAN_CONTEXT + 1));
  open(0);
  const pairs = (ex.sparse || []).filter(([, k]) => k > 0).sort((a, b) => b[2] - a[2]).slice(0, SPAN_PAIRS);
  for (const [q, k] of pairs) { open(q); open(k); }
  for (let i = 0; i < n;) {
    if (keep[i]) { i++; continue; }
    let j = i;
    while (j < n && !keep[j]) j++;
    const hidden = [];
    for (let node = tv.spans[i]; node && node !== tv.spans[j]; node = node.nextSibling) hidden.push(node);
    for (const node of hidden) node.hidden = true;
    const gap = h('button', {
      type: 'button', class: 'token-gap', title: `show positions ${i}–${j - 1}`,
      onclick: () => { for (const node of hidden) node.hidden = false; gap.remove(); },
    }, `⋯ ${(j - i).toLocaleString()} tokens`);
    tv.el.insertBefore(gap, tv.spans[i]);
    i = j;
  }
}

/** Dataset examples grouped by decile bucket; see TokenView for hover/click behaviour. */
function renderExamples(el, { payload, ctx, name }) {
  const exs = payload.examples || [];
  const buckets = (payload.buckets || []).filter((b) => b.examples && b.examples.length);
  const views = new Map();
  const slots = new Map();
  let mode = ctx.get('color') === 'key' ? 'key' : 'query';
  let attrKey = null;
  let attrInstance = null;

  const modeBtn = (m2, text) => h('button', {
    type: 'button', class: 'toggle', 'data-mode': m2, 'aria-pressed': String(mode === m2),
    onclick: () => ctx.set({ color: m2 === 'key' ? 'key' : null }, { replace: true }),
  }, text);
  const bar = h('span', { class: 'legend-bar' });
  const modeLabel = h('span', { class: 'mode-label', id: 'mode-label', 'aria-live': 'polite' });
  const modeBar = h('div', { class: 'toolbar sticky' },
    h('span', {}, 'Colour by'),
    modeBtn('query', 'max as query'), modeBtn('key', 'max as key'),
    h('kbd', { title: 'keyboard shortcut' }, 't'),
    h('span', { class: 'legend' }, '0 ', bar, ' 1'),
    modeLabel);
  const hint = h('p', { class: 'muted small examples-hint' }, 'Click a query token, then an earlier (or the same) key token, to open its QK/OV attribution; Esc clears.');

  function showMode() {
    modeLabel.textContent = mode === 'key'
      ? 'Key mode: hover a token to see the queries attending to it'
      : 'Query mode: hover a token to see the keys it attends to';
    modeLabel.title = mode === 'key'
      ? 'Each token is coloured by the most attention it receives from any later query.'
      : 'Each token is coloured by its largest attention to any key (key 0 excluded).';
    bar.style.background = gradient(mode === 'key' ? oranges : blues);
    for (const b of modeBar.querySelectorAll('button.toggle')) b.setAttribute('aria-pressed', String(b.dataset.mode === mode));
  }

  function exampleCard(i) {
    const ex = exs[i];
    const tv = new TokenView({
      strs: ex.strs, docStarts: ex.doc_starts || [], maxAsQuery: ex.max_as_query, maxAsKey: ex.max_as_key,
      sparse: ex.sparse, mode,
      onSelect: (q, k) => ctx.set({ ex: i, q, k }, { replace: k === null }),
    });
    tv.el.dataset.example = String(i);
    views.set(i, tv);
    collapseLong(tv, ex);
    const slot = h('div', { class: 'attr-slot' });
    slots.set(i, slot);
    return h('article', { class: 'example', id: `ex-${i}` },
      h('div', { class: 'example-head' },
        h('span', {}, h('strong', {}, `sequence ${ex.sequence}`), h('span', { class: 'muted' }, ` · max attention ${fmt(ex.max_attention, 3)} · ${ex.strs.length} tokens`)),
        h('span', { class: 'grow' }),
        exportButtons(`${name}_seq${ex.sequence}`, { svg: () => tv.toSVG(`${name} · sequence ${ex.sequence} · coloured by max attention as ${tv.mode}`) })),
      tv.el, slot);
  }

  const wanted = () => intParam(ctx, 'ex');
  const bucketEls = buckets.map((b, bi) => {
    const body = h('div', { class: 'bucket-body' });
    const hasWanted = b.examples.includes(wanted());
    const det = h('details', { class: 'bucket', open: bi < 2 || hasWanted },
      h('summary', {}, h('strong', {}, `max attention ${fmt(b.lo, 2)} – ${fmt(b.hi, 2)}`), h('span', { class: 'muted' }, ` · ${b.examples.length} example${b.examples.length === 1 ? '' : 's'}`)),
      body);
    const fill = () => {
      if (body.childElementCount) return;
      for (const i of b.examples) if (exs[i]) body.append(exampleCard(i));
      apply();
    };
    if (det.open) fill();
    det.addEventListener('toggle', () => { if (det.open) fill(); });
    return det;
  });

  function apply() {
    const exI = wanted();
    const q = intParam(ctx, 'q');
    const k = intParam(ctx, 'k');
    for (const [i, tv] of views) {
      tv.setMode(mode);
      if (i === exI) tv.setSelection(q, k);
      else tv.setSelection(null, null);
    }
    const key = exI !== null && q !== null && k !== null && exs[exI] ? `${exI}:${q}:${k}:${ctx.get('basis')}` : null;
    if (key !== attrKey) {
      if (attrInstance && attrInstance.unmount) attrInstance.unmount();
      for (const s of slots.values()) clear(s);
      attrInstance = null;
      attrKey = key;
      const slot = key ? slots.get(exI) : null;
      if (slot) {
        const ex = exs[exI];
        attrInstance = renderAttribution(slot, {
          ctx, head: name, query: q, key: k, strs: ex.strs, sequence: ex.sequence,
          basis: ctx.get('basis'),
          onBasis: (b) => ctx.set({ basis: b }),
          onClose: () => ctx.set({ ex: null, q: null, k: null }),
        });
      }
    }
  }

  function onKey(ev) {
    if (typingTarget(ev) || ev.metaKey || ev.ctrlKey || ev.altKey) return;
    if (ev.key === 't' || ev.key === 'T') {
      ev.preventDefault();
      ctx.set({ color: mode === 'key' ? null : 'key' }, { replace: true });
    } else if (ev.key === 'Escape') {
      ctx.set({ ex: null, q: null, k: null });
    }
  }
  document.addEventListener('keydown', onKey);

  el.append(modeBar, hint, exs.length
    ? h('div', { class: 'buckets' }, bucketEls)
    : h('div', { class: 'note' }, 'This head has no stored examples.'));
  showMode();
  apply();
  const exI = wanted();
  if (exI !== null && document.getElementById(`ex-${exI}`)) {
    requestAnimationFrame(() => document.getElementById(`ex-${exI}`)?.scrollIntoView({ block: 'start' }));
  }

  return {
    update(c) {
      ctx = c;
      const newMode = c.get('color') === 'key' ? 'key' : 'query';
      if (newMode !== mode) { mode = newMode; showMode(); }
      const exI2 = wanted();
      if (exI2 !== null) {
        const det = bucketEls.find((d, bi) => buckets[bi].examples.includes(exI2));
        if (det && !det.open) det.open = true;
      }
      apply();
    },
    unmount() {
      document.removeEventListener('keydown', onKey);
      if (attrInstance && attrInstance.unmount) attrInstance.unmount();
    },
  };
}
