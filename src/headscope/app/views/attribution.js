// Attribution panel for one (query, key) pair of one head: QK terms (query component × key
// component), query and key marginals, the check line "total = … · model score = …", the OV
// terms with promoted / suppressed tokens, and the circuit diagram. Precomputed files first,
// then the live server (data.exampleAttribution); custom text goes straight to the server.

import * as data from '../data.js';
import { h, clear, fmt, fixed, errorBox, loading, select } from '../lib/dom.js';
import { s, svgRoot, fitText } from '../lib/svg.js';
import { describeComponent, parseComponent } from '../lib/components.js';
import { labelToken } from '../lib/tokens.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { exportButtons } from '../lib/export.js';
import { circuitDiagram } from './circuit.js';
import { featureHref } from './feature.js';
import { edgeGraphHref } from './edge_graph.js';
import { curvePanel } from './intervention_curve.js';

function bar(value, maxAbs) {
  const f = Math.min(1, Math.abs(value) / (maxAbs || 1));
  const pos = value >= 0;
  return h('div', { class: 'vbar', title: String(value) },
    h('div', { class: `vbar-fill ${pos ? 'pos' : 'neg'}`, style: { width: `${(f * 50).toFixed(1)}%`, [pos ? 'left' : 'right']: '50%' } }));
}

function componentCell(name, features, ctx, onFeature = null) {
  const d = describeComponent(name, features);
  const tag = ['bias', 'error'].includes(d.kind) ? h('span', { class: `tag tag-${d.kind}` }, d.kind === 'error' ? 'error' : 'bias') : null;
  const text = d.kind === 'head' && ctx ? h('a', { href: ctx.href(['head', d.head]) }, d.text) : d.text;
  const page = d.kind === 'feature' ? featureHref(ctx, name) : null;
  const link = page ? h('a', { href: page, class: 'feature-link', title: `${name}: its feature page`, onclick: (ev) => ev.stopPropagation() }, '↗') : null;
  const cell = h('td', { class: `comp comp-${d.kind}`, title: name }, tag, text, link);
  const f = features && features[name];
  if (d.kind === 'feature' && f) {
    cell.classList.add('has-card');
    cell.tabIndex = 0;
    const card = () => [
      h('div', { class: 'tip-title' }, d.text),
      f.density !== undefined ? h('div', { class: 'muted' }, `density ${fmt(f.density, 3)}`) : null,
      f.top_contexts && f.top_contexts.length ? [h('div', { class: 'tip-sub' }, 'top contexts'), h('ul', { class: 'tip-list' }, f.top_contexts.slice(0, 6).map((t) => h('li', {}, labelToken(t))))] : null,
      f.promoted && f.promoted.length ? [h('div', { class: 'tip-sub' }, 'promoted tokens'), h('div', {}, f.promoted.slice(0, 10).map((t) => h('span', { class: 'chip' }, labelToken(typeof t === 'string' ? t : t.token))))] : null,
    ];
    cell.addEventListener('mouseenter', (ev) => showTip(card(), ev.clientX, ev.clientY));
    cell.addEventListener('mousemove', (ev) => showTip(card(), ev.clientX, ev.clientY));
    cell.addEventListener('mouseleave', hideTip);
    cell.addEventListener('focus', () => { const r = cell.getBoundingClientRect(); showTip(card(), r.right, r.top); });
    cell.addEventListener('blur', hideTip);
  }
  if (d.kind === 'feature' && onFeature) {
    cell.classList.add('clickable');
    cell.title = `${name}: click for its virtual weights through this head`;
    cell.addEventListener('click', () => onFeature(name));
  }
  const kindClass = d.kind === 'bias' || d.kind === 'error' ? `row-${d.kind}` : '';
  return { cell, kindClass };
}

/** Virtual weights of one feature through a head's W_Q or W_K (live server), explained. */
function virtualWeightsPanel(panel, head, label, side, ctx = null) {
  const p = parseComponent(label);
  const other = side === 'key' ? 'query' : 'key';
  clear(panel).append(loading(`Virtual weights of ${label} through ${head}…`));
  data.api.virtualWeights({ head, feature: p.index, side }).then((vw) => {
    const list = (rows) => h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', { class: 'num' }, 'cosine'), h('th', {}, 'feature'))),
      h('tbody', {}, rows.slice(0, 10).map((r) => h('tr', {}, h('td', { class: 'num' }, fixed(r.cosine, 3)),
        h('td', {}, featureHref(ctx, r.feature) ? h('a', { href: featureHref(ctx, r.feature) }, r.feature) : r.feature,
          r.label || (r.card && r.card.label) ? h('span', { class: 'muted' }, ` · ${r.label || r.card.label}`) : null)))));
    const self = featureHref(ctx, vw.feature);
    clear(panel).append(h('h4', {}, 'Virtual weights · ', self ? h('a', { href: self }, vw.feature) : vw.feature, ` through ${vw.head}’s ${side} projection`),
      h('p', { class: 'muted small vw-explain' },
        `Every feature’s decoder vector is pushed through ${vw.head}’s frozen pre-norm and W_${side === 'key' ? 'K' : 'Q'} (or W_${side === 'key' ? 'Q' : 'K'} for the other side), positions left out. `,
        `Same side: which features this head’s ${side} projection maps near ${vw.feature}. Other side: which ${other} features it would meet with a high score.`),
      h('div', { class: 'attr-grid' },
        h('div', { class: 'marg' }, h('h4', {}, 'Same side'),
          h('p', { class: 'muted small' }, `features whose ${side} projections point the same way: the head can hardly tell them apart as ${side === 'query' ? 'queries' : 'keys'}`),
          list(vw.same_side)),
        h('div', { class: 'marg' }, h('h4', {}, 'Other side'),
          h('p', { class: 'muted small' }, `${other}-side features this ${side} matches: a high score when they meet`),
          list(vw.other_side))));
  }).catch((err) => clear(panel).append(errorBox(err)));
}

function qkBlock(qk, ctx) {
  const features = qk.features || {};
  const terms = qk.terms || [];
  const maxAbs = Math.max(1e-12, ...terms.map((t) => Math.abs(t.value)));
  const vwPanel = h('div', { class: 'vw-panel', id: 'virtual-weights' });
  const onQuery = (label) => virtualWeightsPanel(vwPanel, qk.head, label, 'query', ctx);
  const onKey = (label) => virtualWeightsPanel(vwPanel, qk.head, label, 'key', ctx);
  const termRows = terms.map((t, i) => {
    const a = componentCell(t.query, features, ctx, onQuery);
    const b = componentCell(t.key, features, ctx, onKey);
    return h('tr', { class: [a.kindClass, b.kindClass].filter(Boolean).join(' ') },
      h('td', { class: 'num muted' }, i + 1), a.cell, b.cell, h('td', { class: 'num' }, fixed(t.value)), h('td', { class: 'barcell' }, bar(t.value, maxAbs)));
  });
  const marg = (rows, title, onFeature) => {
    const mx = Math.max(1e-12, ...(rows || []).map((r) => Math.abs(r.value)));
    return h('div', { class: 'marg' }, h('h4', {}, title), h('div', { class: 'table-scroll' }, h('table', { class: 'data compact' },
      h('thead', {}, h('tr', {}, h('th', {}, 'component'), h('th', { class: 'num' }, 'value'), h('th', {}, ''))),
      h('tbody', {}, (rows || []).map((r) => {
        const c = componentCell(r.component, features, ctx, onFeature);
        return h('tr', { class: c.kindClass }, c.cell, h('td', { class: 'num' }, fixed(r.value)), h('td', { class: 'barcell' }, bar(r.value, mx)));
      })))));
  };
  const capped = qk.capped_score !== null && qk.capped_score !== undefined;
  return h('section', { class: 'attr-block' },
    h('h3', {}, 'QK attribution', h('span', { class: 'muted small', title: `basis: ${qk.basis || 'components'}` },
      ` · basis: ${data.basisKind(qk.basis) === 'sae' ? 'SAE features' : 'model components'} · attention ${fixed(qk.attention, 4)}`)),
    h('div', { class: 'check-line', 'data-total': qk.total, 'data-score': qk.score },
      h('span', { class: 'total' }, `total = ${fixed(qk.total)}`), ' · ',
      h('span', { class: 'score' }, `model score = ${fixed(qk.score)}`),
      capped ? [' · ', h('span', { class: 'capped' }, `capped score = ${fixed(qk.capped_score)}`)] : null,
      h('span', { class: 'muted small' }, '  (total is the sum of all terms; model score is the pre-softmax score the model computed)')),
    qk.masked ? h('div', { class: 'note' }, 'The key is outside this layer’s attention window: the model masks this pair, so its attention is 0 whatever the score.') : null,
    h('div', { class: 'attr-grid' },
      h('div', { class: 'terms' }, h('h4', {}, `Top ${terms.length}${qk.n_terms ? ` of ${qk.n_terms}` : ''} terms (query component × key component)`), h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact' },
        h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', {}, 'query component'), h('th', {}, 'key component'), h('th', { class: 'num' }, 'value'), h('th', {}, ''))),
        h('tbody', {}, termRows)))),
      marg(qk.query_marginals, 'Query marginals', onQuery),
      marg(qk.key_marginals, 'Key marginals', onKey)),
    vwPanel);
}

// The OV value-side table: each component's output through this edge (attention × its value ×
// W_O), read two ways. Rows are in the server's order, by |projection|.
const OV_PROJECTION_DOC = 'the component’s output projected on the direction of the head’s total output: signed, the projections sum to the total ‖output‖; rows are sorted by its size';
const OV_NORM_DOC = 'the length of the component’s own output vector, whatever its direction';

function ovBlock(ov, ctx, features, liveText = null) {
  const terms = ov.terms || [];
  // Older precomputed files and imported runs may lack the signed projection.
  const signed = terms.length > 0 && terms.every((t) => Number.isFinite(t.value));
  const mx = Math.max(1e-12, ...terms.map((t) => (signed ? Math.abs(t.value) : t.value_norm)));
  const logitList = (rows, cls) => h('div', { class: 'table-scroll' }, h('table', { class: 'data compact' },
    h('thead', {}, h('tr', {}, h('th', {}, 'token'), h('th', { class: 'num' }, 'logit'))),
    h('tbody', {}, (rows || []).map((r) => h('tr', {}, h('td', { class: `tokcell ${cls}` }, labelToken(r.token)), h('td', { class: 'num' }, fixed(r.logit, 3)))))));
  const head = signed
    ? h('tr', {}, h('th', {}, 'component'), h('th', { class: 'num', title: OV_PROJECTION_DOC }, 'projection'), h('th', {}, ''),
      h('th', { class: 'num', title: OV_NORM_DOC }, '‖output‖'), h('th', {}, 'top logits'))
    : h('tr', {}, h('th', {}, 'component'), h('th', { class: 'num', title: OV_NORM_DOC }, '‖output‖'), h('th', {}, ''), h('th', {}, 'top logits'));
  const row = (t) => {
    const c = componentCell(t.component, features, ctx);
    const tops = (t.logit_top || []).map((x) => (typeof x === 'string' ? x : x.token));
    const chips = h('td', { class: 'tokcell' }, tops.map((x) => h('span', { class: 'chip' }, labelToken(x))));
    return signed
      ? h('tr', { class: c.kindClass }, c.cell, h('td', { class: 'num' }, fixed(t.value, 4)), h('td', { class: 'barcell' }, bar(t.value, mx)),
        h('td', { class: 'num muted' }, fixed(t.value_norm, 4)), chips)
      : h('tr', { class: c.kindClass }, c.cell, h('td', { class: 'num' }, fixed(t.value_norm, 4)), h('td', { class: 'barcell' }, bar(t.value_norm, mx)), chips);
  };
  const explain = signed
    ? h('p', { class: 'muted small table-doc' }, h('strong', {}, 'projection'), `: ${OV_PROJECTION_DOC}. `, h('strong', {}, '‖output‖'), `: ${OV_NORM_DOC}.`)
    : h('p', { class: 'muted small table-doc' }, h('strong', {}, '‖output‖'), `: ${OV_NORM_DOC}.`);
  return h('section', { class: 'attr-block' },
    h('h3', {}, 'OV attribution', h('span', { class: 'muted small' }, ` · attention ${fixed(ov.attention, 4)} · total ‖output‖ ${fixed(ov.total_norm, 4)}`,
      Number.isFinite(ov.model_norm) ? ` · model ‖output‖ ${fixed(ov.model_norm, 4)}` : '',
      Number.isFinite(ov.max_abs_diff) ? ` · max |difference| ${fmt(ov.max_abs_diff, 2)}` : '')),
    h('div', { class: 'attr-grid' },
      h('div', { class: 'terms' }, h('h4', {}, 'Value-side components: what each one adds to the head’s output'), explain,
        h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact ov-terms' },
          h('thead', {}, head),
          h('tbody', {}, terms.map(row))))),
      h('div', { class: 'marg readouts' },
        h('h4', { title: 'this edge’s output through the final norm and the unembedding (logit lens)' }, 'Output promotes'),
        ov.key_token_rank ? h('p', { class: 'muted small' }, 'the attended token “', labelToken(ov.key_token), `” ranks ${ov.key_token_rank} here`) : null,
        logitList(ov.promoted, 'pos'),
        h('h4', { title: 'this edge’s output through the final norm and the unembedding (logit lens)' }, 'Output suppresses'),
        logitList(ov.suppressed, 'neg')),
      ov.key_token_readout && ov.key_token_readout.length
        ? h('div', { class: 'marg readouts' },
          h('h4', { title: 'the OV circuit applied to the attended token’s embedding alone: what the head writes for this token in any context (a copying head lists the token itself)' },
            'OV on “', labelToken(ov.key_token), '” alone'),
          h('p', { class: 'muted small' }, 'what the head writes for this token in any context'),
          logitList(ov.key_token_readout, 'pos'))
        : null),
    ov.pairs && ov.pairs.length ? ovPairsBlock(ov, ctx, features, liveText) : null);
}

/** Which heads carry the edge from a value feature (layer L, at the key) to an output feature
 * (layer L+1, at the query): head loadings, with the residual and MLP bypass (live server). */
function loadingsPanel(panel, pair, ov, liveText, ctx = null) {
  const a = parseComponent(pair.value_feature);
  const b = parseComponent(pair.output_feature);
  clear(panel).append(loading(`Head loadings of ${pair.value_feature} → ${pair.output_feature}…`));
  let liveQuery = null;
  liveText().then(({ text, query, key }) => {
    if (query === null || key === null) throw new Error('the live server tokenises this example differently; paste its text into Custom text');
    liveQuery = { text, query };
    return data.api.headLoadings({ text, layer: a.layer, source_feature: a.index, source_pos: key, target_feature: b.index, target_pos: query });
  }).then((r) => {
    const heads = r.heads.slice(0, 9);
    const sum = r.heads.reduce((acc, x) => acc + x.loading, 0);
    clear(panel).append(
      h('h4', {}, `Which heads carry ${r.source.feature} (key, position ${r.source.position}) → ${r.target.feature} (query, position ${r.target.position})`),
      h('p', { class: 'muted small loadings-sum' }, `edge ${fmt(r.edge, 4)} = heads ${fmt(sum, 4)} + residual ${fmt(r.residual, 4)} + MLP ${fmt(r.mlp, 4)} `,
        `(attention patterns and norm scales frozen, the MLP linearised; the target is read by its ${r.target_vector}, as “Tracing Attention Computation Through Feature Interactions” defines head loadings with the source’s decoder vector)`),
      ctx && liveQuery ? h('p', { class: 'small' }, h('a', {
        class: 'edge-graph-link',
        href: edgeGraphHref(ctx, { text: liveQuery.text, layer: b.layer, feature: b.index, pos: liveQuery.query }),
        title: 'every edge into this target feature, ranked, with the heads that carry each',
      }, `Edge graph into ${r.target.feature} at position ${r.target.position} →`)) : null,
      h('table', { class: 'data compact' },
        h('thead', {}, h('tr', {}, h('th', {}, 'head'), h('th', { class: 'num' }, 'loading'), h('th', { class: 'num' }, 'share'), h('th', { class: 'num' }, 'attention'))),
        h('tbody', {}, heads.map((x) => h('tr', { class: x.head === ov.head ? 'current' : '' }, h('td', {}, x.head), h('td', { class: 'num' }, fmt(x.loading, 4)),
          h('td', { class: 'num' }, `${fmt(100 * x.share, 3)}%`), h('td', { class: 'num' }, fixed(x.attention, 3)))))));
  }).catch((err) => clear(panel).append(errorBox(err)));
}

// OV in the feature basis on both sides: value-side rows at the key × output features (of the
// next layer's residual dictionary, or the layer's z dictionary) at the query.
function ovPairsBlock(ov, ctx, features, liveText = null) {
  const loadPanel = h('div', { class: 'vw-panel head-loadings' });
  const feats = { ...(features || {}), ...(ov.features || {}) };
  const pairs = ov.pairs.slice(0, 40);
  const mx = Math.max(1e-12, ...pairs.map((p) => Math.abs(p.value)));
  const worst = Math.max(0, ...(ov.outputs || []).map((o) => Math.abs(o.total - o.model) / Math.max(Math.abs(o.model), 1e-12)));
  const outRows = (ov.outputs || []).slice(0, 12).map((o) => {
    const c = componentCell(o.feature, feats, ctx);
    return h('tr', {}, c.cell, h('td', { class: 'num' }, fixed(o.activation, 3)), h('td', { class: 'num' }, fixed(o.total, 4)), h('td', { class: 'num muted' }, fixed(o.model, 4)));
  });
  return h('div', { class: 'ov-pairs' },
    h('h4', {}, `Feature pairs: value feature at the key × output feature at the query (top ${pairs.length} of ${ov.n_pairs})`),
    h('p', { class: 'muted small table-doc' }, `Each term is what one value-side row (a feature, the decoder bias, the SAE error or the projection bias) writes through this edge, read by one output feature’s encoder (${ov.output_dictionary}). `,
      `For every output feature the terms add up to the head’s actual output read by that feature (largest relative difference ${fmt(worst, 2)}).`),
    h('div', { class: 'attr-grid' },
      h('div', { class: 'terms' }, h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact ov-pair-terms' },
        h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', {}, 'value side (key)'), h('th', {}, 'output side (query)'), h('th', { class: 'num' }, 'value'), h('th', {}, ''))),
        h('tbody', {}, pairs.map((p, i) => {
          const a = componentCell(p.value_feature, feats, ctx);
          const b = componentCell(p.output_feature, feats, ctx);
          const pa = parseComponent(p.value_feature);
          const pb = parseComponent(p.output_feature);
          const edge = liveText && pa && pb && pa.kind === 'feature' && pb.kind === 'feature' && pb.layer === pa.layer + 1;
          const tr = h('tr', { class: [a.kindClass, edge ? 'clickable' : ''].filter(Boolean).join(' ') }, h('td', { class: 'num muted' }, i + 1), a.cell, b.cell, h('td', { class: 'num' }, fixed(p.value, 4)), h('td', { class: 'barcell' }, bar(p.value, mx)));
          if (edge) {
            tr.title = 'click: which heads carry this edge (head loadings)';
            tr.addEventListener('click', () => loadingsPanel(loadPanel, p, ov, liveText, ctx));
          }
          return tr;
        }))))),
      h('div', { class: 'marg' }, h('h4', {}, 'Output features'), h('table', { class: 'data compact' },
        h('thead', {}, h('tr', {}, h('th', {}, 'feature'), h('th', { class: 'num', title: 'its activation at the query' }, 'act'), h('th', { class: 'num', title: 'sum of its pair terms' }, 'total'), h('th', { class: 'num', title: 'the head’s actual output through this edge, read by its encoder' }, 'model'))),
        h('tbody', {}, outRows)))),
    loadPanel);
}

/** SVG summary of the panel (for export): check line, top QK terms and top OV terms. */
function attributionSVG(title, qk, ov) {
  const W = 820;
  const parts = [s('text', { x: 12, y: 22, 'font-size': 14, 'font-weight': 600 }, title)];
  let y = 44;
  const rowsOut = (rows, head) => {
    parts.push(s('text', { x: 12, y, 'font-size': 13, 'font-weight': 600 }, head));
    y += 8;
    const mx = Math.max(1e-12, ...rows.map((r) => Math.abs(r.value)));
    for (const r of rows) {
      y += 18;
      parts.push(s('text', { x: 12, y, 'font-size': 11.5 }, fitText(r.label, 520, 11.5)));
      parts.push(s('text', { x: 620, y, 'font-size': 11.5, 'text-anchor': 'end' }, r.text));
      const w = (Math.abs(r.value) / mx) * 90;
      parts.push(s('rect', { x: r.value >= 0 ? 720 : 720 - w, y: y - 10, width: w, height: 11, fill: r.value >= 0 ? '#d6604d' : '#4393c3' }));
    }
    parts.push(s('line', { x1: 720, x2: 720, y1: y - rows.length * 18 - 8, y2: y + 4, stroke: '#999' }));
    y += 28;
  };
  if (qk) {
    parts.push(s('text', { x: 12, y, 'font-size': 12.5 }, `total = ${fixed(qk.total)} · model score = ${fixed(qk.score)} · attention = ${fixed(qk.attention)}`));
    y += 26;
    rowsOut((qk.terms || []).slice(0, 20).map((t) => ({
      label: `${describeComponent(t.query, qk.features).text}  ×  ${describeComponent(t.key, qk.features).text}`, value: t.value, text: fixed(t.value),
    })), 'QK terms (query × key)');
  }
  if (ov) {
    const terms = ov.terms || [];
    const signed = terms.length > 0 && terms.every((t) => Number.isFinite(t.value));
    rowsOut(terms.slice(0, 12).map((t) => {
      const v = signed ? t.value : t.value_norm;
      return { label: describeComponent(t.component, qk && qk.features).text, value: v, text: fixed(v) };
    }), signed
      ? `OV value components: projection on the output (total ‖output‖ ${fixed(ov.total_norm)})`
      : `OV value components: ‖output‖ (total ‖output‖ ${fixed(ov.total_norm)})`);
  }
  return svgRoot(W, y, parts);
}

/**
 * Render the panel into `el`. For run examples pass {sequence, strs}; for custom text pass
 * {text}. Returns {unmount}.
 */
export function renderAttribution(el, { ctx, head, query, key, strs = null, sequence = null, text = null, basis = null, onBasis = null, onClose = null }) {
  let alive = true;
  const qTok = strs ? labelToken(strs[query]) : '';
  const kTok = strs ? labelToken(strs[key]) : '';
  const body = h('div', { class: 'attr-body' }, loading('Loading attributions…'));
  const srcEl = h('span', { class: 'badge' }, '…');
  let results = { qk: null, ov: null };
  const title = `${head} · query ${query}${qTok ? ` “${qTok}”` : ''} → key ${key}${kTok ? ` “${kTok}”` : ''}`;
  const layer = parseComponent(head)?.layer ?? NaN;
  const basisSel = onBasis ? select([['components', 'model components'], ['sae', 'SAE features']], data.basisKind(basis), onBasis,
    { 'aria-label': 'attribution basis' }) : null;
  const saeOption = basisSel ? basisSel.querySelector('option[value="sae"]') : null;
  const basisWhy = h('span', { class: 'muted small basis-why' });
  const panel = h('section', { class: 'panel attribution', 'aria-label': 'attribution' },
    h('div', { class: 'panel-head' },
      h('h3', {}, `Attribution · ${title}`),
      srcEl,
      h('span', { class: 'grow' }),
      basisSel ? h('label', { class: 'small' }, 'basis ', basisSel) : null,
      exportButtons(`${head}_attribution_${query}_${key}`, { svg: () => attributionSVG(title, results.qk, results.ov) }),
      onClose ? h('button', { type: 'button', class: 'small', title: 'close (Esc)', onclick: onClose }, '×') : null,
      basisSel ? basisWhy : null),
    body);
  el.append(panel);

  /** Offer the feature basis only where the server has this layer's dictionary; say why not. */
  function showAvailability(fb, live) {
    if (!basisSel) return;
    saeOption.disabled = fb.ok === false;
    saeOption.textContent = fb.ok === false ? 'SAE features (unavailable)' : 'SAE features';
    basisSel.title = `SAE features: ${fb.why}`;
    // Without a live server the select's title says it; with one, the reason is worth a line.
    basisWhy.textContent = fb.ok === false && live ? `SAE features: ${fb.why}` : '';
  }

  const load = (kind, b) => (text !== null
    ? data.textAttribution(kind, { text, head, query, key, basis: b })
    : data.exampleAttribution(kind, { head, sequence, query, key, strs, basis: b }));

  async function run() {
    const { live } = await data.liveStatus();
    let fb = await data.featureBasis(layer);
    showAvailability(fb, live);
    let use = basis;
    let fallback = null;
    if (data.basisKind(basis) === 'sae' && fb.ok === false && live) {
      use = 'components';
      fallback = fb.why;
    }
    let [qkR, ovR] = await Promise.allSettled([load('qk', use), load('ov', use)]);
    if ([qkR, ovR].some((r) => r.status === 'rejected' && r.reason instanceof data.NoDictionaryError)) {
      // The server said which layers it has: from now on the menu knows, and this pair is
      // shown in components.
      fb = await data.featureBasis(layer);
      showAvailability(fb, live);
      use = 'components';
      fallback = fb.why;
      [qkR, ovR] = await Promise.allSettled([load('qk', use), load('ov', use)]);
    }
    if (!alive) return;
    clear(body);
    const sources = [qkR, ovR].filter((r) => r.status === 'fulfilled').map((r) => r.value.source);
    if (sources.length === 2 && sources.every((x) => x === 'none')) {
      srcEl.textContent = 'not available';
      body.append(h('div', { class: 'note needs-server', title: 'the precomputed pairs are listed in the run manifest under "attributions"' },
        h('strong', {}, 'This pair has no precomputed attribution'), ', so it needs a live server: run ',
        h('code', {}, 'headscope serve RUN --model M'), '.'));
      return;
    }
    if (sources.length) {
      srcEl.textContent = sources.includes('live') ? 'live server' : 'precomputed';
      srcEl.classList.add(sources.includes('live') ? 'live' : 'pre');
    } else {
      srcEl.textContent = 'failed';
    }
    const shownBasis = [qkR, ovR].map((r) => r.status === 'fulfilled' && r.value.result && r.value.result.basis).find(Boolean);
    if (basisSel && shownBasis) basisSel.value = data.basisKind(shownBasis);
    if (basisSel && !sources.includes('live') && !live) {
      basisSel.disabled = true;
      basisSel.title = 'precomputed result; a live server can compute the other basis';
    }
    if (fallback) {
      basisWhy.textContent = ''; // the note below says it
      body.append(h('div', { class: 'note basis-note' },
        h('strong', {}, `SAE features are not available for ${head}`), `: ${fallback}; showing model components.`));
    }
    const qk = qkR.status === 'fulfilled' && qkR.value.result ? qkR.value.result : null;
    const ov = ovR.status === 'fulfilled' && ovR.value.result ? ovR.value.result : null;
    results = { qk, ov };
    if (qk) body.append(qkBlock(qk, ctx));
    else body.append(errorBox(qkR.status === 'rejected' ? qkR.reason : 'No QK attribution for this pair.'));
    if (qk && text !== null && live) body.append(curvePanel({ text, head, query, key, qk, basis: use }));
    const liveText = () => (text !== null ? Promise.resolve({ text, query, key }) : data.exampleLiveText(sequence, strs, query, key));
    if (ov) body.append(ovBlock(ov, ctx, qk && qk.features, live ? liveText : null));
    else body.append(errorBox(ovR.status === 'rejected' ? ovR.reason : 'No OV attribution for this pair.'));
    if (qk || ov) {
      const diagram = () => circuitDiagram({ qk, ov, ctx });
      body.append(h('section', { class: 'attr-block circuit' },
        h('div', { class: 'panel-head' }, h('h3', {}, 'Circuit'), h('span', { class: 'muted small' }, 'top components by marginal attribution; edge width ∝ |term|, red positive, blue negative'), h('span', { class: 'grow' }),
          exportButtons(`${head}_circuit_${query}_${key}`, { svg: diagram })),
        h('div', { class: 'figure-scroll' }, diagram())));
    }
    if (ctx && ctx.hooks) ctx.hooks.attribution = { total: qk && qk.total, score: qk && qk.score, source: srcEl.textContent };
  }
  run();

  return {
    unmount() {
      alive = false;
      hideTip();
    },
  };
}
