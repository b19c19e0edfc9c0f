// Custom text (#/custom, live server): type any text, see a head's attention on it, pick a
// (query, key) pair, rank all heads on that pair, and open QK/OV attribution or composition
// for it. URL params: text, head, q, k, panel (attr|comp), color.

import * as data from '../data.js';
import { h, clear, fixed, errorBox, loading, needsServer, parseHead, typingTarget } from '../lib/dom.js';
import { blues, oranges, gradient } from '../lib/color.js';
import { TokenView, labelToken } from '../lib/tokens.js';
import { exportButtons } from '../lib/export.js';
import { hideTip } from '../lib/tooltip.js';
import { renderAttribution } from './attribution.js';
import { s, svgRoot, fitText } from '../lib/svg.js';

const LONG_TEXT = 600; // tokens beyond which the text scrolls in a box of its own
const EXAMPLE_TEXT = 'Madrid, Barcelona, Seville, Lyon and Valencia are all cities in Spain.';

function intParam(ctx, name) {
  const v = ctx.get(name);
  const n = v === null ? NaN : Number.parseInt(v, 10);
  return Number.isFinite(n) ? n : null;
}

export function mount(root, ctx) {
  let alive = true;
  const container = h('div', { class: 'view view-custom' }, h('h1', {}, 'Custom text'), loading('Checking for a live server…'));
  root.append(container);
  let state = null;

  data.liveStatus().then((st) => {
    if (!alive) return;
    if (!st.live) {
      clear(container).append(h('h1', {}, 'Custom text'), needsServer('Custom text', st.server));
      ctx.ready('custom');
      return;
    }
    state = build(container, ctx, st.health);
    state.update(ctx);
    ctx.ready('custom');
  });

  return {
    update(c) {
      ctx = c;
      if (!state) return false;
      state.update(c);
      return true;
    },
    unmount() {
      alive = false;
      if (state) state.unmount();
      hideTip();
    },
  };
}

function build(container, ctx0, health) {
  let ctx = ctx0;
  const textarea = h('textarea', { id: 'custom-text', rows: 4, 'aria-label': 'text', spellcheck: 'false' });
  const headInput = h('input', { id: 'custom-head', type: 'text', size: 8, 'aria-label': 'head', autocomplete: 'off', spellcheck: 'false' });
  const formMsg = h('span', { class: 'error-text small', 'aria-live': 'polite' });
  const form = h('form', { class: 'panel form-grid', onsubmit: (ev) => {
    ev.preventDefault();
    const p = parseHead(headInput.value);
    if (!p) { formMsg.textContent = 'head must look like L5H3'; return; }
    if (p.layer >= health.n_layers || p.head >= health.n_heads) { formMsg.textContent = `${p.name} is outside this model (${health.n_layers} layers × ${health.n_heads} heads)`; return; }
    formMsg.textContent = '';
    ctx.set({ text: textarea.value, head: p.name, q: null, k: null, panel: null });
  } },
  h('label', { for: 'custom-text' }, 'Text'), textarea,
  h('div', { class: 'form-row' }, h('label', {}, 'Head ', headInput), h('button', { type: 'submit', class: 'primary' }, 'Run'), formMsg,
    h('span', { class: 'muted small' }, `model: ${health.model} · ${health.n_layers} layers × ${health.n_heads} heads · texts up to ${(health.max_tokens ?? 0).toLocaleString()} tokens`)));

  const out = h('div', { class: 'custom-out' });
  container.replaceChildren(h('h1', {}, 'Custom text'), form, out);

  let tv = null;
  let key = null;
  let pairKey = null;
  let panelKey = null;
  let attr = null;
  let tokens = null;
  const pairEl = h('div', {});
  const rankEl = h('div', {});
  const panelEl = h('div', {});
  const keysEl = h('div', {});
  const attendCache = new Map();

  function onKey(ev) {
    if (typingTarget(ev) || ev.metaKey || ev.ctrlKey || ev.altKey) return;
    if (ev.key === 't' || ev.key === 'T') ctx.set({ color: ctx.get('color') === 'key' ? null : 'key' }, { replace: true });
    else if (ev.key === 'Escape') ctx.set({ q: null, k: null, panel: null });
  }
  document.addEventListener('keydown', onKey);

  async function showText(text, head) {
    const cacheKey = `${head}\u0000${text}`;
    // The server summarises the pattern (max weight as query / as key, each query's top keys)
    // block by block, so a text of thousands of tokens never travels as a T x T pattern.
    if (!attendCache.has(cacheKey)) attendCache.set(cacheKey, data.api.attendSummary(text, head));
    const res = await attendCache.get(cacheKey).catch((err) => { attendCache.delete(cacheKey); throw err; });
    tokens = res.tokens;
    const long = tokens.length > LONG_TEXT;
    tv = new TokenView({
      strs: res.tokens, maxAsQuery: res.max_as_query, maxAsKey: res.max_as_key, sparse: res.top_keys,
      mode: ctx.get('color') === 'key' ? 'key' : 'query',
      onSelect: (q, k) => ctx.set({ q, k, panel: null }, { replace: k === null }),
    });
    const bar = h('span', { class: 'legend-bar', style: { background: gradient(tv.mode === 'key' ? oranges : blues) } });
    clear(out).append(
      h('section', { class: 'panel' },
        h('div', { class: 'panel-head' },
          h('h3', {}, `${head} on your text`),
          h('span', { class: 'muted small' }, `coloured by max attention as ${tv.mode === 'key' ? 'key' : 'query'} (press t) `), h('span', { class: 'legend' }, '0 ', bar, ' 1'),
          h('span', { class: 'grow' }),
          h('a', { href: ctx.href(['head', head]), class: 'small' }, `open ${head}’s page`),
          exportButtons(`${head}_custom`, { svg: () => tv.toSVG(`${head} · custom text`) })),
        h('p', { class: 'muted small' }, 'Hover a token to see its keys. Click a query token, then an earlier (or the same) key token, to rank every head on that pair.'),
        long ? h('p', { class: 'muted small' }, `${tokens.length.toLocaleString()} tokens: the text scrolls in its box; a chosen query's strongest keys are listed below it, each a click away however far back.`) : null,
        long ? h('div', { class: 'tokens-scroll' }, tv.el) : tv.el,
        keysEl),
      pairEl, rankEl, panelEl);
  }

  // The chosen query's strongest keys (from the summary) as buttons that pick the pair: in a
  // long text a far-back key is thousands of tokens away; its box scrolls to the key (or query).
  function showQueryKeys(q, k, head) {
    clear(keysEl);
    if (!tv || q === null) return;
    const box = tv.el.parentElement;
    if (box && box.classList.contains('tokens-scroll') && tv.spans[q]) {
      const span = tv.spans[k ?? q];
      box.scrollTop = Math.max(0, span.offsetTop - box.clientHeight / 2);
    }
    const keys = tv.sparse.byQuery.get(q) || [];
    if (!keys.length) return;
    keysEl.append(h('div', { class: 'toolbar query-keys' },
      h('span', { class: 'small' }, `${head} at query ${q} “${labelToken(tokens[q])}” attends most to:`),
      keys.map(([kk, w]) => h('button', {
        type: 'button', class: kk === k ? 'primary' : '', 'data-key': kk,
        title: `${q - kk} tokens back`,
        onclick: () => ctx.set({ q, k: kk, panel: null }),
      }, `${kk} “${labelToken(tokens[kk])}” ${fixed(w, 3)}`))));
  }

  function pairBar(q, k, text, head) {
    const panel = ctx.get('panel');
    const btn = (p, label) => h('button', { type: 'button', 'aria-pressed': String(panel === p), class: panel === p ? 'primary' : '', onclick: () => ctx.set({ panel: panel === p ? null : p }) }, label);
    return h('div', { class: 'toolbar pair-bar' },
      h('strong', {}, `Pair: query ${q} “${labelToken(tokens[q])}” → key ${k} “${labelToken(tokens[k])}”`),
      btn('attr', `QK / OV attribution for ${head}`), btn('comp', `Composition for ${head}`),
      h('button', { type: 'button', onclick: () => ctx.set({ q: null, k: null, panel: null }) }, 'Clear (Esc)'));
  }

  async function rank(text, q, k) {
    clear(rankEl).append(loading('Ranking all heads on this pair…'));
    try {
      const res = await data.api.rankHeads(text, q, k);
      const rows = res.heads || [];
      const maxA = Math.max(1e-9, ...rows.map((r) => r.attention));
      const rankSVG = () => {
        const top = rows.slice(0, 30);
        const parts = [s('text', { x: 10, y: 20, 'font-size': 14, 'font-weight': 600 }, `Heads ranked by attention, query ${q} → key ${k}`)];
        top.forEach((r, i) => {
          const y = 40 + i * 18;
          parts.push(s('text', { x: 10, y: y + 10, 'font-size': 11.5 }, r.head));
          parts.push(s('rect', { x: 80, y, width: (r.attention / maxA) * 300, height: 12, fill: '#4292c6' }));
          parts.push(s('text', { x: 390, y: y + 10, 'font-size': 11 }, fixed(r.attention, 3)));
        });
        return svgRoot(460, 50 + top.length * 18, parts);
      };
      clear(rankEl).append(h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', {}, 'All heads ranked on this pair'), h('span', { class: 'muted small' }, 'click a head to show its attention on this text'), h('span', { class: 'grow' }),
          exportButtons('rank_heads', { svg: rankSVG })),
        h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact', id: 'rank-table' },
          h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), h('th', {}, 'head'), h('th', { class: 'num' }, 'attention'), h('th', {}, ''), h('th', { class: 'num' }, 'score'), h('th', {}, ''))),
          h('tbody', {}, rows.map((r, i) => h('tr', { class: r.head === ctx.get('head') ? 'current' : '' },
            h('td', { class: 'num muted' }, i + 1),
            h('td', {}, h('a', { href: ctx.href(['custom'], { text, head: r.head, q, k }), class: 'head-link' }, r.head)),
            h('td', { class: 'num' }, fixed(r.attention, 4)),
            h('td', { class: 'barcell' }, h('div', { class: 'hbar' }, h('div', { style: { width: `${(100 * r.attention) / maxA}%` } }))),
            h('td', { class: 'num' }, fixed(r.score, 4)),
            h('td', {}, h('a', { href: ctx.href(['head', r.head]), class: 'small' }, 'page')))))))));
    } catch (err) {
      clear(rankEl).append(errorBox(err));
    }
  }

  async function composition(text, head, q, k) {
    clear(panelEl).append(loading('Computing composition…'));
    try {
      const res = await data.api.composition({ text, head, query: q, key: k });
      const table = (rows, title, what) => {
        const mx = Math.max(1e-9, ...(rows || []).map((r) => Math.abs(r.value)));
        return h('div', { class: 'marg' }, h('h4', {}, title), h('div', { class: 'table-scroll tall' }, h('table', { class: 'data compact' },
          h('thead', {}, h('tr', {}, h('th', {}, 'earlier head'), h('th', { class: 'num' }, 'value'), h('th', {}, ''), h('th', {}, 'it attends to'), h('th', { class: 'num' }, 'weight'))),
          h('tbody', {}, (rows || []).map((r) => h('tr', {},
            h('td', {}, h('a', { href: ctx.href(['custom'], { text, head: r.head, q: what === 'k' ? k : q }) }, r.head)),
            h('td', { class: 'num' }, fixed(r.value, 4)),
            h('td', { class: 'barcell' }, h('div', { class: 'hbar' }, h('div', { style: { width: `${(100 * Math.abs(r.value)) / mx}%` } }))),
            h('td', { class: 'tokcell' }, r.attends_to !== undefined ? `${r.attends_to} “${labelToken(r.attends_to_token ?? tokens[r.attends_to] ?? '')}”` : '–'),
            h('td', { class: 'num' }, fixed(r.weight, 3))))))));
      };
      const compSVG = () => {
        const rows = [...(res.k_composition || []).slice(0, 12).map((r) => ['K', r]), ...(res.q_composition || []).slice(0, 12).map((r) => ['Q', r])];
        const mx = Math.max(1e-9, ...rows.map(([, r]) => Math.abs(r.value)));
        const parts = [s('text', { x: 10, y: 20, 'font-size': 14, 'font-weight': 600 }, `Composition into ${head}, query ${q} → key ${k}`)];
        rows.forEach(([kind, r], i) => {
          const y = 40 + i * 18;
          parts.push(s('text', { x: 10, y: y + 10, 'font-size': 11.5 }, `${kind}  ${r.head}`));
          parts.push(s('rect', { x: 100, y, width: (Math.abs(r.value) / mx) * 260, height: 12, fill: kind === 'K' ? '#f16913' : '#4292c6' }));
          parts.push(s('text', { x: 370, y: y + 10, 'font-size': 11 }, fitText(`${fixed(r.value, 3)} · attends to ${r.attends_to ?? '–'} “${labelToken(r.attends_to_token ?? '')}”`, 260, 11)));
        });
        return svgRoot(640, 50 + rows.length * 18, parts);
      };
      clear(panelEl).append(h('section', { class: 'panel' },
        h('div', { class: 'panel-head' }, h('h3', {}, `Composition into ${head}`), h('span', { class: 'muted small' }, 'earlier heads whose output at the key (K-composition) or query (Q-composition) this head reads'), h('span', { class: 'grow' }),
          exportButtons(`${head}_composition`, { svg: compSVG })),
        h('div', { class: 'attr-grid' }, table(res.k_composition, 'K-composition (writes to the key position)', 'k'), table(res.q_composition, 'Q-composition (writes to the query position)', 'q'))));
    } catch (err) {
      clear(panelEl).append(errorBox(err));
    }
  }

  async function update(c) {
    ctx = c;
    const text = c.get('text');
    const head = parseHead(c.get('head'))?.name || null;
    if (document.activeElement !== textarea) textarea.value = text ?? EXAMPLE_TEXT;
    if (document.activeElement !== headInput) headInput.value = head || headInput.value || 'L0H0';
    if (!text || !head) {
      clear(out).append(h('div', { class: 'note' }, 'Type a text and a head (like L5H3), then Run.'));
      key = null;
      return;
    }
    const newKey = `${head}\u0000${text}\u0000${c.get('color')}`;
    if (newKey !== key) {
      key = newKey;
      pairKey = null;
      panelKey = null;
      clear(out).append(loading(`Running ${head}…`));
      try {
        await showText(text, head);
      } catch (err) {
        clear(out).append(errorBox(err));
        return;
      }
      if (key !== newKey) return;
    }
    let q = intParam(c, 'q');
    let k = intParam(c, 'k');
    if (q !== null && (q < 0 || q >= tokens.length)) q = null;
    if (k !== null && (k < 0 || k > (q ?? -1))) k = null;
    tv.setSelection(q, k);
    showQueryKeys(q, k, head);
    const pk = q !== null && k !== null ? `${q}:${k}` : null;
    if (pk !== pairKey) {
      pairKey = pk;
      clear(rankEl);
      if (pk) rank(text, q, k);
    }
    clear(pairEl);
    if (pk) pairEl.append(pairBar(q, k, text, head));
    const panel = pk ? c.get('panel') : null;
    const pnk = panel ? `${panel}:${pk}:${head}:${c.get('basis')}` : null;
    if (pnk !== panelKey) {
      panelKey = pnk;
      if (attr) { attr.unmount(); attr = null; }
      clear(panelEl);
      if (panel === 'attr') {
        attr = renderAttribution(panelEl, {
          ctx: c, head, query: q, key: k, text, strs: tokens, basis: c.get('basis') || 'components',
          onBasis: (b) => ctx.set({ basis: b === 'components' ? null : b }),
          onClose: () => ctx.set({ panel: null }),
        });
      } else if (panel === 'comp') {
        composition(text, head, q, k);
      }
    }
  }

  return {
    update,
    unmount() {
      document.removeEventListener('keydown', onKey);
      if (attr) attr.unmount();
    },
  };
}
