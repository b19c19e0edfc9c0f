// Describe tab of the head page (#/head/L5H3/describe): write the head's description as named
// rules (YAML, docs/describe.md), see how much of its attention they cover on the run's stored
// examples (mass, max-attention events, top-bucket examples; per rule and all together) and the
// strongest counterexamples, updating as you type; save the description with the run
// (RUN/descriptions/L5H3.yaml + .json, through the server).

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, needsServer } from '../lib/dom.js';
import { labelToken } from '../lib/tokens.js';

const STARTER = `# What does this head do? One named rule per behaviour (docs/describe.md).
rules:
  - name: previous token
    distance: 1
`;

const pct = (v) => (v === null || v === undefined ? '–' : `${(100 * v).toFixed(1)}%`);

function bar(v) {
  return h('div', { class: 'cov-bar', 'aria-hidden': 'true' }, h('div', { style: { width: `${Math.round(100 * (v || 0))}%` } }));
}

/** "[[key]]" and "{{query}}" markers of a counterexample's context as highlighted spans. */
export function markedContext(text) {
  const out = [];
  const re = /\[\[([\s\S]*?)\]\]|\{\{([\s\S]*?)\}\}/g;
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) out.push(text.slice(last, m.index));
    if (m[1] !== undefined) {
      const inner = m[1];
      const q = inner.match(/^\{\{([\s\S]*)\}\}$/);
      out.push(q ? h('mark', { class: 'ctx-key ctx-query', title: 'the query attends to itself' }, q[1]) : h('mark', { class: 'ctx-key', title: 'key' }, inner));
    } else {
      out.push(h('mark', { class: 'ctx-query', title: 'query' }, m[2]));
    }
    last = re.lastIndex;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function coverageTable(r) {
  const row = (c, cls) => h('tr', { class: cls || '' },
    h('td', {}, c.rule),
    ...['mass', 'events', 'top_bucket'].map((k) => h('td', { class: 'num cov' }, bar(c[k]), h('span', {}, pct(c[k])))));
  return h('table', { class: 'data compact coverage' },
    h('thead', {}, h('tr', {},
      h('th', {}, 'rule'),
      h('th', { class: 'num', title: "share of the head's attention mass on pairs the rule covers" }, 'mass'),
      h('th', { class: 'num', title: `share of max-attention events (a query's largest weight ≥ ${r.min_event}) whose pair it covers` }, 'events'),
      h('th', { class: 'num', title: "share of the top-bucket examples whose maximum pair it covers" }, 'top bucket'))),
    h('tbody', {}, r.rules.map((c) => row(c)), row(r.all_rules, 'all')));
}

function counterexamples(r, onOpen) {
  if (!r.counterexamples.length) return h('p', { class: 'muted' }, 'No counterexamples: no uncovered attention above the threshold.');
  return h('ol', { class: 'counterexamples' }, r.counterexamples.map((c) => h('li', {},
    h('div', { class: 'cx-head' },
      h('strong', {}, fmt(c.weight, 3)),
      h('span', { class: 'muted' }, ` · sequence ${c.sequence} · query ${c.query} `),
      h('code', {}, labelToken(c.query_token)), h('span', { class: 'muted' }, ' → key '),
      h('code', {}, labelToken(c.key_token)),
      h('span', { class: 'muted' }, ` · distance ${c.query - c.key}`),
      onOpen ? h('button', { type: 'button', class: 'linkish', onclick: () => onOpen(c), title: 'open this query in the knockout view' }, 'knock out…') : null),
    h('div', { class: 'cx-context' }, markedContext(c.context)))));
}

function shares(rows, what, label) {
  if (!rows.length) return null;
  return h('table', { class: 'data compact' },
    h('thead', {}, h('tr', {}, h('th', {}, what), h('th', { class: 'num' }, 'uncovered share'))),
    h('tbody', {}, rows.slice(0, 8).map((x) => h('tr', {}, h('td', { class: 'tokcell' }, label(x)), h('td', { class: 'num' }, pct(x.share))))));
}

/** The coverage report of a DescribeResult. */
export function renderReport(r, { onOpen = null } = {}) {
  const bucket = r.top_bucket ? `[${fmt(r.top_bucket[0], 2)}, ${fmt(r.top_bucket[1], 2)})` : '–';
  return h('div', { class: 'describe-report' },
    h('p', { class: 'muted small' },
      `${r.source} · ${r.sequences} sequences · ${r.queries.toLocaleString('en-US')} queries · `,
      `${r.events.toLocaleString('en-US')} max-attention events · top bucket ${bucket} (${r.top_bucket_examples} examples)`,
      r.include_sink ? ' · attention to position 0 counts' : ' · attention to position 0 (the sink) not counted'),
    coverageTable(r),
    h('h4', {}, 'Strongest counterexamples (high attention no rule covers)'),
    counterexamples(r, onOpen),
    h('div', { class: 'uncovered' },
      shares(r.uncovered_key_tokens, 'key token', (x) => labelToken(x.token)),
      shares(r.uncovered_distances, 'distance q − k', (x) => (x.max === null ? `≥ ${x.min}` : x.min === x.max ? String(x.min) : `${x.min}–${x.max}`))));
}

export function renderDescribe(el, { payload, ctx, name }) {
  const area = h('textarea', { class: 'rules-text', rows: 16, spellcheck: 'false', 'aria-label': 'rules (YAML)' });
  const onSel = h('select', { 'aria-label': 'test on' },
    h('option', { value: 'stored' }, "stored patterns (no model)"),
    h('option', { value: 'examples' }, 'recomputed on the example sequences (model)'));
  const status = h('span', { class: 'muted small', 'aria-live': 'polite' });
  const saved = h('span', { class: 'small saved-state' });
  const out = h('div', { class: 'describe-out' });
  const testBtn = h('button', { type: 'button', onclick: () => test() }, 'Test');
  const saveBtn = h('button', { type: 'button', class: 'primary', onclick: () => save() }, 'Save with the run');
  let seq = 0;
  let timer = null;
  let savedText = null;

  const exIndex = new Map((payload.examples || []).map((e, i) => [Number(e.sequence), i]));
  const onOpen = (c) => {
    const i = exIndex.get(Number(c.sequence));
    ctx.go(['head', name, 'knockout'], i === undefined ? {} : { ex: i, q: c.query, ko: c.key });
  };

  function markSaved() {
    const same = savedText !== null && area.value === savedText;
    saved.textContent = savedText === null ? 'not saved yet' : same ? `saved as descriptions/${name}.yaml` : 'edited since saved';
    saved.className = `small saved-state ${same ? 'ok' : ''}`;
  }

  async function test() {
    const mine = ++seq;
    status.textContent = 'testing…';
    try {
      const r = await data.runApi.describe({ head: name, rules: area.value, on: onSel.value });
      if (mine !== seq) return;
      clear(out).append(renderReport(r, { onOpen }));
      status.textContent = `all rules: ${pct(r.all_rules.mass)} of the mass`;
      ctx.hooks.describe = r;
    } catch (err) {
      if (mine !== seq) return;
      status.textContent = '';
      clear(out).append(errorBox(err));
    }
  }

  async function save() {
    status.textContent = 'saving…';
    try {
      const r = await data.runApi.saveDescription(name, { rules: area.value, on: onSel.value });
      savedText = r.rules;
      clear(out).append(renderReport(r.result, { onOpen }));
      status.textContent = `saved: all rules cover ${pct(r.result.all_rules.mass)} of the mass`;
      markSaved();
    } catch (err) {
      status.textContent = '';
      clear(out).append(errorBox(err));
    }
  }

  area.addEventListener('input', () => {
    markSaved();
    clearTimeout(timer);
    // stored patterns answer in milliseconds: update as the user types; a model run waits for Test
    if (onSel.value === 'stored') timer = setTimeout(test, 500);
  });
  onSel.addEventListener('change', () => test());

  el.append(loading('Loading the saved description…'));
  data.liveStatus().then(async (st) => {
    clear(el);
    if (!st.server) {
      el.append(needsServer('Testing a description'));
      return;
    }
    if (!st.live) onSel.querySelector('option[value=examples]').disabled = true;
    let savedDesc = null;
    try {
      savedDesc = await data.runApi.description(name);
    } catch (err) {
      el.append(errorBox(err));
    }
    savedText = savedDesc && savedDesc.rules;
    area.value = savedText || STARTER;
    el.append(
      h('div', { class: 'describe-layout' },
        h('section', { class: 'panel describe-editor' },
          h('div', { class: 'panel-head' }, h('h3', {}, `Describe ${name}`), saved),
          h('p', { class: 'muted small' }, 'Named rules over (query, key) pairs: token text or regex on either side, distance, same token, induction, position; ',
            h('code', {}, 'all'), ' / ', h('code', {}, 'any'), ' / ', h('code', {}, 'not'), '. Coverage updates as you type.'),
          area,
          h('div', { class: 'form-row' }, h('label', {}, 'Test on ', onSel), testBtn, saveBtn, status)),
        h('section', { class: 'panel describe-result' }, h('div', { class: 'panel-head' }, h('h3', {}, 'Coverage')), out)));
    markSaved();
    if (savedDesc && savedDesc.result) {
      clear(out).append(h('p', { class: 'muted small' }, 'As saved:'), renderReport(savedDesc.result, { onOpen }));
      ctx.hooks.describe = savedDesc.result;
    } else {
      test();
    }
  });

  return {
    unmount() { clearTimeout(timer); seq++; },
  };
}
