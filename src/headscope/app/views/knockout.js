// Knockout tab of the head page (#/head/L5H3/knockout?ex=0&q=17&ko=12,15): one query of a stored
// example, the head's full score profile over its keys next to its attention, and where the
// attention goes when keys are taken out of the softmax: clicked keys, or every key a rule
// matches. "cheap" renormalises the head's own scores (exact for this layer's pattern as it
// stands, no forward pass); "exact" reruns the model with no head of layers 0..L attending to
// those keys. Below: the head's "A if present, otherwise B" pairs on its stored examples.

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, needsServer } from '../lib/dom.js';
import { s, svgRoot, linear, axes, niceTicks } from '../lib/svg.js';
import { displayToken, labelToken } from '../lib/tokens.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { exportButtons } from '../lib/export.js';

const COLORS = { score: '#6b7280', before: '#4292c6', cheap: '#e66100', exact: '#238b45', knocked: '#b2182b' };

function intList(v) {
  return String(v || '').split(',').map((x) => Number.parseInt(x, 10)).filter(Number.isFinite);
}

/** The stored example's strongest pair with an earlier, non-sink key (a query attending to
 * itself or to position 0 is a poor first knockout), else its strongest pair. */
function defaultPair(ex) {
  let best = null;
  let any = null;
  for (const [q, k, w] of ex.sparse || []) {
    if (q === 0) continue;
    if (!any || w > any[2]) any = [q, k, w];
    if (k === 0 || k >= q) continue;
    if (!best || w > best[2]) best = [q, k, w];
  }
  best = best || any;
  return best ? { q: best[0], k: best[1] } : { q: ex.strs.length - 1, k: null };
}

const NEAR = 48; // keys shown before the query when the chart is zoomed (key 0 always)

/** The key positions the chart draws: all, or key 0 and the NEAR keys up to the query. */
export function chartKeys(r, all) {
  const q = r.before.length - 1;
  if (all || q < NEAR + 8) return Array.from({ length: q + 1 }, (_, k) => k);
  return [0, ...Array.from({ length: NEAR }, (_, j) => q - NEAR + 1 + j)];
}

/** Score profile (top) and attention before / after (bottom) over `keys` (default 0..query). */
export function profileChart(r, keys = null, width = 900) {
  keys = keys || chartKeys(r, true);
  const n = keys.length;
  const knocked = new Set(r.knocked);
  const h1 = 110;
  const h2 = 150;
  const area1 = { x0: 52, x1: width - 12, y0: 14, y1: h1 };
  const area2 = { x0: 52, x1: width - 12, y0: h1 + 34, y1: h1 + 34 + h2 };
  const xs = linear([-0.5, n - 0.5], [area1.x0, area1.x1]);
  const band = (area1.x1 - area1.x0) / n;
  const finite = keys.map((k) => r.scores[k]).filter((v) => v !== null);
  const lo = Math.min(0, ...finite);
  const hi = Math.max(1e-9, ...finite);
  const ys1 = linear([lo, hi], [area1.y1, area1.y0]);
  const after = r.exact || r.cheap;
  const top = Math.max(1e-6, ...keys.flatMap((k) => [r.before[k], r.cheap[k], r.exact ? r.exact[k] : 0]));
  const ys2 = linear([0, top * 1.05], [area2.y1, area2.y0]);
  const g = s('g', {});
  const tip = (k) => h('div', {},
    h('div', {}, h('strong', {}, `key ${k}`), ' ', h('code', {}, labelToken(r.tokens[k])), knocked.has(k) ? h('span', { class: 'badge warn' }, 'knocked out') : null),
    h('div', {}, `score ${r.scores[k] === null ? 'masked' : fmt(r.scores[k], 4)}`),
    h('div', {}, `attention ${fmt(r.before[k], 4)} → cheap ${fmt(r.cheap[k], 4)}`, r.exact ? `, exact ${fmt(r.exact[k], 4)}` : ''));
  keys.forEach((k, i) => {
    const x = xs(i) - band / 2;
    const sc = r.scores[k];
    const hit = s('rect', { x, y: area1.y0, width: Math.max(band, 1), height: area2.y1 - area1.y0, fill: 'transparent', 'data-key': k, class: 'ko-hit' });
    if (sc !== null) {
      g.append(s('rect', { x: x + band * 0.1, y: Math.min(ys1(sc), ys1(0)), width: Math.max(1, band * 0.8), height: Math.abs(ys1(sc) - ys1(0)), fill: knocked.has(k) ? COLORS.knocked : COLORS.score, class: 'ko-score' }));
    }
    const w = Math.max(1, band * 0.4);
    g.append(s('rect', { x: x + band * 0.1, y: ys2(r.before[k]), width: w, height: ys2(0) - ys2(r.before[k]), fill: knocked.has(k) ? COLORS.knocked : COLORS.before }));
    g.append(s('rect', { x: x + band * 0.1 + w, y: ys2(after[k]), width: w, height: ys2(0) - ys2(after[k]), fill: r.exact ? COLORS.exact : COLORS.cheap }));
    if (r.exact) g.append(s('line', { x1: x + band * 0.1 + w, x2: x + band * 0.1 + 2 * w, y1: ys2(r.cheap[k]), y2: ys2(r.cheap[k]), stroke: COLORS.cheap, 'stroke-width': 2 }));
    hit.addEventListener('mousemove', (ev) => showTip(tip(k), ev.clientX, ev.clientY));
    hit.addEventListener('mouseleave', hideTip);
    g.append(hit);
  });
  const ticks = niceTicks(0, n - 1, Math.min(12, n)).filter((t) => Number.isInteger(t));
  if (n > 1 && keys[1] !== 1) { // zoomed: key 0, then a gap
    g.append(s('line', { x1: (xs(0) + xs(1)) / 2, x2: (xs(0) + xs(1)) / 2, y1: area1.y0, y2: area2.y1, stroke: '#9aa1ad', 'stroke-dasharray': '3 3' }));
  }
  const ax1 = axes(area1, xs, ys1, { yLabel: 'score', xTicks: [] });
  const ax2 = axes(area2, xs, ys2, { xLabel: 'key position', yLabel: 'attention', xTicks: ticks, xFormat: (t) => String(keys[t]) });
  const legend = s('g', {});
  let lx = area2.x0;
  const items = [['before', COLORS.before], ['after (cheap)', COLORS.cheap], ...(r.exact ? [['after (exact)', COLORS.exact]] : []), ['knocked out', COLORS.knocked]];
  for (const [label, color] of items) {
    legend.append(s('rect', { x: lx, y: h1 + 14, width: 10, height: 10, fill: color }), s('text', { x: lx + 14, y: h1 + 23, 'font-size': 11 }, label));
    lx += 28 + label.length * 6.2;
  }
  return svgRoot(width, area2.y1 + 36, ax1, ax2, g, legend);
}

function tokenStrip(r, { onKey, before }) {
  const knocked = new Set(r.knocked);
  const top = Math.max(1e-6, ...before);
  return h('div', { class: 'tokens ko-tokens' }, r.tokens.map((t, i) => {
    if (i > r.query) return null;
    const d = displayToken(t);
    const a = before[i] / top;
    const cls = ['tok', d.cls || '', knocked.has(i) ? 'knocked' : '', i === r.query ? 'sel-query' : ''].join(' ');
    return h('span', {
      class: cls, 'data-pos': i, tabindex: 0, role: 'button',
      title: `${i}: attention ${fmt(r.before[i], 3)} → ${fmt((r.exact || r.cheap)[i], 3)}`,
      style: { background: `rgba(66,146,198,${a.toFixed(3)})`, color: a > 0.6 ? '#fff' : null },
      onclick: () => onKey(i),
      onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); onKey(i); } },
    }, d.text);
  }));
}

function movesTable(r) {
  return h('table', { class: 'data compact ko-moves' },
    h('thead', {}, h('tr', {}, h('th', {}, 'key'), h('th', {}, 'token'), h('th', { class: 'num' }, 'before'), h('th', { class: 'num' }, 'cheap'), h('th', { class: 'num' }, 'exact'))),
    h('tbody', {}, r.moves.map((m) => h('tr', {},
      h('td', { class: 'num' }, m.key), h('td', { class: 'tokcell' }, labelToken(m.token)),
      h('td', { class: 'num' }, fmt(m.before, 3)), h('td', { class: 'num' }, fmt(m.cheap, 3)), h('td', { class: 'num' }, fmt(m.exact, 3))))));
}

function priorityTable(p, onPick) {
  if (!p.pairs.length) return h('p', { class: 'muted' }, `No query of the ${p.sequences} stored example sequences had its runner-up key take the mass (A ≥ ${p.min_first}, B ≤ ${p.max_second_before} before and ≥ ${p.min_second} after).`);
  return h('table', { class: 'data compact priority' },
    h('thead', {}, h('tr', {}, h('th', {}, 'A (attended)'), h('th', {}, 'B (otherwise)'), h('th', { class: 'num' }, 'queries'),
      h('th', { class: 'num', title: 'mean attention to A' }, 'A'), h('th', { class: 'num', title: 'mean attention to B while A is there' }, 'B before'),
      h('th', { class: 'num', title: 'mean attention to B with A knocked out (cheap)' }, 'B after'), h('th', {}, 'example'))),
    h('tbody', {}, p.pairs.map((x) => h('tr', {},
      h('td', { class: 'tokcell' }, labelToken(x.first)), h('td', { class: 'tokcell' }, labelToken(x.second)), h('td', { class: 'num' }, x.count),
      h('td', { class: 'num' }, fmt(x.first_attention, 3)), h('td', { class: 'num' }, fmt(x.second_before, 3)), h('td', { class: 'num' }, fmt(x.second_after, 3)),
      h('td', {}, h('button', { type: 'button', class: 'linkish', onclick: () => onPick(x.example) }, `seq ${x.example.sequence} · q ${x.example.query}`))))));
}

export function renderKnockout(el, { payload, ctx, name }) {
  const exs = payload.examples || [];
  const body = h('div', { class: 'ko-body' });
  const prio = h('div', { class: 'ko-priority' });
  let seq = 0;
  let align = null;

  const exSel = h('select', { 'aria-label': 'example' }, exs.map((e, i) => h('option', { value: i }, `sequence ${e.sequence} · max ${fmt(e.max_attention, 2)}`)));
  const ruleIn = h('input', { type: 'text', class: 'rule-in', placeholder: 'or a rule, e.g. key: {text: [".", ","]}', 'aria-label': 'rule' });
  const exact = h('input', { type: 'checkbox', checked: true, 'aria-label': 'exact' });
  const status = h('span', { class: 'muted small', 'aria-live': 'polite' });
  exSel.addEventListener('change', () => ctx.set({ ex: exSel.value, q: null, ko: null, rule: null }));
  ruleIn.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') ctx.set({ rule: ruleIn.value.trim() || null, ko: null }); });
  exact.addEventListener('change', () => ctx.set({ cheap: exact.checked ? null : 1 }));

  function state(c) {
    const i = Math.min(Math.max(0, Number.parseInt(c.get('ex', '0'), 10) || 0), exs.length - 1);
    const ex = exs[i];
    const dflt = defaultPair(ex);
    const q = c.get('q') !== null ? Number.parseInt(c.get('q'), 10) : dflt.q;
    const rule = c.get('rule');
    let ko = intList(c.get('ko'));
    if (!c.get('ko') && !rule && c.get('q') === null && dflt.k !== null) ko = [dflt.k];
    return { i, ex, q, ko, rule, cheap: c.get('cheap') === '1', all: c.get('all') === '1' };
  }

  async function draw(c) {
    const st = state(c);
    const mine = ++seq;
    exSel.value = String(st.i);
    ruleIn.value = st.rule || '';
    exact.checked = !st.cheap;
    if (!st.ko.length && !st.rule) {
      const pick = (k) => { if (k !== st.q) ctx.set({ ko: k, q: st.q }, { replace: true }); };
      clear(body).append(h('p', { class: 'muted' }, `Query ${st.q}: click a key token to knock it out, or give a rule.`),
        h('div', { class: 'tokens ko-tokens' }, st.ex.strs.slice(0, st.q + 1).map((t, k) => h('span', {
          class: `tok ${displayToken(t).cls || ''} ${k === st.q ? 'sel-query' : ''}`, 'data-pos': k, onclick: () => pick(k),
        }, displayToken(t).text))));
      return;
    }
    status.textContent = 'knocking out…';
    try {
      align = await data.alignRunExample(st.ex.sequence, st.ex.strs);
      const { map } = align;
      if (map[st.q] === null || st.ko.some((k) => map[k] === null)) throw new data.ApiError('The live server tokenises this example differently from the run at these positions.');
      const r = await data.api.knockout({
        text: align.text, head: name, query: map[st.q], keys: st.ko.length ? st.ko.map((k) => map[k]) : null,
        rule: st.rule || null, cheap_only: st.cheap,
      });
      if (mine !== seq) return;
      ctx.hooks.knockout = r;
      const inv = new Map(map.map((j, i2) => [j, i2]));
      const toggle = (j) => {
        const k = inv.get(j);
        if (k === undefined || j === r.query) return;
        const set = new Set(st.rule ? [] : st.ko);
        if (set.has(k)) set.delete(k); else set.add(k);
        ctx.set({ ko: [...set].sort((a, b) => a - b).join(',') || null, rule: null, q: st.q }, { replace: true });
      };
      const after = r.exact || r.cheap;
      const keys = chartKeys(r, st.all);
      const chart = profileChart(r, keys);
      const zoom = r.before.length > keys.length
        ? h('button', { type: 'button', class: 'linkish', onclick: () => ctx.set({ all: 1 }, { replace: true }) }, `show all ${r.before.length} keys`)
        : st.all && chartKeys(r, false).length < r.before.length
          ? h('button', { type: 'button', class: 'linkish', onclick: () => ctx.set({ all: null }, { replace: true }) }, 'zoom in near the query') : null;
      for (const hit of chart.querySelectorAll('.ko-hit')) hit.addEventListener('click', () => toggle(Number(hit.dataset.key)));
      const gone = r.moves[0];
      clear(body).append(
        h('p', { class: 'ko-summary' },
          h('strong', {}, `query ${st.q} `), h('code', {}, labelToken(r.tokens[r.query])), ': ',
          `knocked out ${r.knocked.length} key${r.knocked.length === 1 ? '' : 's'}${r.rule ? ` (rule "${r.rule}")` : ''} holding ${fmt(r.knocked_mass, 3)} of the attention`,
          gone ? [' · most moves to key ', h('strong', {}, String(gone.key)), ' ', h('code', {}, labelToken(gone.token)), ` (${fmt(gone.before, 3)} → ${fmt(after[gone.key], 3)})`] : ''),
        h('div', { class: 'ko-chart' }, chart, exportButtons(`${name}_knockout_q${st.q}`, { svg: () => profileChart(r, keys) })),
        keys.length < r.before.length ? h('p', { class: 'muted small' }, `Keys 0 and ${keys[1]}..${r.query} shown (the keys in between hold ${fmt(r.before.slice(1, keys[1]).reduce((a, b) => a + b, 0), 3)} of the attention before, ${fmt(after.slice(1, keys[1]).reduce((a, b) => a + b, 0), 3)} after); `, zoom) : h('p', { class: 'muted small' }, zoom),
        h('p', { class: 'muted small' }, 'Click a bar or a token to knock that key out (or back in). Blue: attention before; orange: the head\'s own scores renormalised without the keys (cheap); green: a forward pass with no head of layers 0..L attending to them (exact).'),
        tokenStrip(r, { onKey: toggle, before: r.before }),
        h('h4', {}, 'Keys whose attention changes most'), movesTable(r));
      status.textContent = '';
    } catch (err) {
      if (mine !== seq) return;
      status.textContent = '';
      clear(body).append(errorBox(err));
    }
  }

  async function loadPriority() {
    clear(prio).append(h('h4', {}, '"A if present, otherwise B" on this head\'s stored examples'), loading('Finding pairs (cheap knockouts of every query\'s top key)…'));
    try {
      const p = await data.runApi.priority({ head: name });
      ctx.hooks.priority = p;
      const hp = p.heads.find((x) => x.head === name);
      clear(prio).append(
        h('h4', {}, '"A if present, otherwise B" on this head\'s stored examples'),
        h('p', { class: 'muted small' }, hp ? `${hp.events} of ${hp.queries} queries (${fmt(100 * hp.share, 3)}%) had their top key A, once knocked out, hand the mass to the runner-up B.` : ''),
        priorityTable(p, (ex) => {
          const i = exs.findIndex((e) => Number(e.sequence) === ex.sequence);
          if (i >= 0) ctx.set({ ex: i, q: ex.query, ko: ex.first, rule: null });
        }));
    } catch (err) {
      clear(prio).append(errorBox(err));
    }
  }

  data.liveStatus().then((st) => {
    if (!st.live) {
      el.append(needsServer('Key knockouts', st.server));
      return;
    }
    if (!exs.length) {
      el.append(h('div', { class: 'note' }, 'This head has no stored examples to knock keys out of.'));
      return;
    }
    el.append(
      h('div', { class: 'toolbar' }, h('label', {}, 'Example ', exSel), ruleIn,
        h('label', { title: 'also run the exact knockout (a forward pass)' }, exact, ' exact'), status),
      body, prio);
    draw(ctx);
    loadPriority();
  });

  return {
    update(c) { ctx = c; if (body.isConnected) draw(c); },
    unmount() { seq++; hideTip(); },
  };
}
