// Intervention curve under a QK attribution (live server; "Tracing Attention Computation Through
// Feature Interactions"): pick a component of the edge (a query- or key-side marginal row), and
// its contribution to this head's query (or key) input is scaled at the query (or key) position
// only; the curve shows the head's attention on the edge, its score and the next token's
// probability over scales -1..3, and the slider re-runs the edge at the chosen scale.

import * as data from '../data.js';
import { h, clear, fixed, errorBox, loading } from '../lib/dom.js';
import { lineChart } from '../lib/svg.js';
import { exportButtons } from '../lib/export.js';
import { labelToken } from '../lib/tokens.js';

const SCALES = Array.from({ length: 17 }, (_, i) => -1 + i * 0.25);

/** The curve section for one edge: `qk` is its QK attribution result (components to offer). */
export function curvePanel({ text, head, query, key, qk, basis = 'components' }) {
  const options = [
    ...(qk.key_marginals || []).slice(0, 8).map((r) => ['key', r.component, r.value]),
    ...(qk.query_marginals || []).slice(0, 8).map((r) => ['query', r.component, r.value]),
  ];
  const pick = h('select', { 'aria-label': 'component to scale' },
    options.map(([side, c, v], i) => h('option', { value: i }, `${side}: ${c} (${fixed(v, 3)})`)));
  const freeze = h('input', { type: 'checkbox', 'aria-label': 'freeze other heads’ patterns' });
  const slider = h('input', { type: 'range', min: -1, max: 3, step: 0.05, value: 0, 'aria-label': 'scale' });
  const readout = h('div', { class: 'curve-readout' });
  const plot = h('div', { class: 'curve-plot' });
  const section = h('section', { class: 'attr-block intervention-curve' },
    h('div', { class: 'panel-head' }, h('h3', {}, 'Intervention curve'),
      h('span', { class: 'muted small' }, `scale one component inside ${head}’s query or key input, at that position only`)),
    h('div', { class: 'controls', style: { display: 'flex', gap: '1.5em', alignItems: 'center', flexWrap: 'wrap' } }, h('label', { class: 'small' }, 'component ', pick),
      h('label', { class: 'small' }, freeze, ' freeze other heads’ patterns'),
      h('label', { class: 'small' }, 'scale ', slider)),
    readout, plot);
  let curve = null;
  const req = () => {
    const [side, component] = options[Number(pick.value)];
    return { text, heads: [head], component, side, query, key, basis, freeze_patterns: freeze.checked };
  };
  const draw = () => {
    if (!curve) return;
    const c = curve;
    const hc = c.heads[0];
    const s = Number(slider.value);
    const chart = () => lineChart({
      series: [
        { name: `${head} attention on key ${c.key}`, x: c.scales, y: hc.attention, color: '#b63b04' },
        { name: `p(${c.target})`, x: c.scales, y: c.prob, color: '#0072B2' },
        { name: 'chosen scale', x: [s, s], y: [0, 1], color: '#999' },
      ],
      width: 520, height: 240, xLabel: `scale of ${c.component} (${c.side} side, position ${c.at.join(', ')})`, yLabel: 'attention / probability', yDomain: [0, 1],
    });
    clear(plot).append(chart(), exportButtons(`${head}_curve_${c.component}`, { svg: chart }));
  };
  const rerun = async () => {
    const s = Number(slider.value);
    try {
      const one = await data.api.interventionCurve({ ...req(), scales: [s] });
      const hc = one.heads[0];
      clear(readout).append(`scale ${fixed(s, 2)}: attention ${fixed(hc.attention[0], 4)} (clean ${fixed(hc.attention_clean, 4)}), score ${fixed(hc.score[0], 3)} (clean ${fixed(hc.score_clean, 3)}), `,
        `p(`, labelToken(one.target), `) ${fixed(one.prob[0], 4)} (clean ${fixed(one.prob_clean, 4)})`);
    } catch (err) {
      clear(readout).append(errorBox(err));
    }
    draw();
  };
  const load = async () => {
    if (!options.length) { clear(plot).append(h('p', { class: 'muted' }, 'No components to scale.')); return; }
    clear(plot).append(loading('Sweeping the scale…'));
    try {
      curve = await data.api.interventionCurve({ ...req(), scales: SCALES });
      draw(); // the curve first: 'ready' means drawn, not waiting on the chosen scale's readout
      section.dataset.ready = '1';
      await rerun();
    } catch (err) {
      clear(plot).append(errorBox(err));
    }
  };
  pick.addEventListener('change', load);
  freeze.addEventListener('change', load);
  slider.addEventListener('input', draw);
  slider.addEventListener('change', rerun);
  load();
  return section;
}
