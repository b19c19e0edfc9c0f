// Heads across models, in the similar-heads tab: this run's heads mapped together with another
// model's heads in one motif space (motifs/across.json, written by `headscope motifs map RUN_A
// RUN_B --save`), and this head's nearest heads in each other model. URL params: am (method and
// neighbourhood, e.g. tsne:15).

import * as data from '../data.js';
import { h, clear, fmt, errorBox, loading, select } from '../lib/dom.js';
import { ScatterPlot } from '../lib/canvasplot.js';
import { showTip, hideTip } from '../lib/tooltip.js';
import { exportButtons } from '../lib/export.js';

const RUN_COLORS = ['#2b6cb0', '#dd6b20', '#2f855a', '#b83280'];

/** A panel for `el`, or nothing when the run has no joint map. Returns {update, unmount}. */
export function renderAcross(el, { ctx, name }) {
  let alive = true;
  let plot = null;
  let across = null;
  let kindSel = null;
  let labels = [];
  const box = h('section', { class: 'panel across' }, loading('Loading the map across models…'));

  const kinds = () => Object.keys(across.maps);
  const kindOf = (c) => (kinds().includes(c.get('am')) ? c.get('am') : kinds().find((k) => k.startsWith('tsne')) || kinds()[0]);

  function draw(c) {
    const kind = kindOf(c);
    kindSel.value = kind;
    // This run's heads come last: drawn on top and, where a head of another model sits on the
    // same spot, the one a click opens.
    const runs = [...across.runs.keys()].filter((r) => r !== across.this_run).concat([across.this_run]);
    const start = (r) => across.heads.slice(0, r).reduce((n, hs) => n + hs.length, 0);
    labels = [];
    const runOf = [];
    const rows = [];
    for (const r of runs) {
      across.heads[r].forEach((hn, j) => { labels.push(`${across.runs[r]}:${hn}`); runOf.push(r); rows.push(start(r) + j); });
    }
    const at = new Map(rows.map((row, i) => [row, i]));
    const self = across.heads[across.this_run].indexOf(name);
    const selfIdx = self >= 0 ? at.get(start(across.this_run) + self) : -1;
    const near = new Set();
    const nearest = (across.nearest[name] || {});
    across.runs.forEach((run, r) => {
      if (r === across.this_run) return;
      for (const nh of (nearest[run] || []).slice(0, 5)) {
        const j = across.heads[r].indexOf(nh.head);
        if (j >= 0) near.add(at.get(start(r) + j));
      }
    });
    const xy = rows.map((row) => across.maps[kind][row]);
    const order = [...labels.keys()].sort((a, b) => (a === selfIdx) - (b === selfIdx) || near.has(a) - near.has(b));
    plot.setData({
      x: xy.map((p) => p[0]), y: xy.map((p) => p[1]),
      colors: runOf.map((r) => RUN_COLORS[r % RUN_COLORS.length]),
      order, emphasis: new Set(selfIdx >= 0 ? [selfIdx] : []),
      xLabel: `${kind.split(':')[0]} 1`, yLabel: `${kind.split(':')[0]} 2`,
      legend: across.runs.map((run, r) => ({ label: r === across.this_run ? `${run} (this run)` : run, color: RUN_COLORS[r % RUN_COLORS.length] })),
      labels,
    });
    plot.setHover(-1, true, [...near]);
    ctx.hooks.acrossCount = labels.length;
    ctx.hooks.acrossPositions = () => plot.clientPositions().map(([x, y], i) => ({ name: labels[i], x, y }));
  }

  function nearestList() {
    const nearest = across.nearest[name] || {};
    return Object.entries(nearest).map(([run, list]) => h('div', { class: 'across-nearest' },
      h('div', { class: 'small' }, h('strong', {}, `Nearest heads of ${run}`), h('span', { class: 'muted' }, ' (energy distance between the heads’ pattern-embedding distributions)')),
      h('ol', { class: 'across-list' }, list.map((nh) => h('li', {}, h('code', {}, nh.head), h('span', { class: 'muted' }, ` d = ${fmt(nh.distance, 4)}`))))));
  }

  data.motifAcross().then((a) => {
    if (!alive) return;
    if (!a) { box.remove(); return; }
    across = a;
    kindSel = select(kinds().map((k) => [k, `${k.split(':')[0]}, ${k.split(':')[1]} neighbours`]), kindOf(ctx),
      (v) => ctx.set({ am: v }, { replace: true }), { id: 'across-kind', 'aria-label': 'map method and neighbourhood' });
    const width = Math.max(520, Math.min(900, el.clientWidth - 30));
    plot = new ScatterPlot({
      width, height: Math.round(width * 0.62), ariaLabel: 'map of heads across models',
      onHover: (i, ev) => {
        if (i < 0) { hideTip(); return; }
        const label = labels[i];
        const mine = label.startsWith(`${across.runs[across.this_run]}:`);
        showTip([h('div', { class: 'tip-title' }, label), h('div', { class: 'muted small' }, mine ? 'click to open' : 'a head of the other model')], ev.clientX, ev.clientY);
      },
      onClick: (i) => {
        const label = labels[i];
        const prefix = `${across.runs[across.this_run]}:`;
        if (label.startsWith(prefix)) ctx.go(['head', label.slice(prefix.length)]);
      },
    });
    clear(box).append(
      h('div', { class: 'panel-head' }, h('h3', {}, 'Across models'),
        h('span', { class: 'muted small' }, `${name} has a black outline; its 5 nearest heads in the other model are ringed in orange`),
        h('span', { class: 'grow' }), h('label', {}, 'map ', kindSel),
        exportButtons(`heads_across_${name}`, { svg: () => plot.toSVG(`Heads across models (${kindOf(ctx)})`), png: () => plot.canvas })),
      h('div', { class: 'across-body' }, plot.el, h('div', { class: 'across-side' }, nearestList())));
    draw(ctx);
  }).catch((err) => { if (alive) clear(box).append(errorBox(err)); });

  el.append(box);
  return {
    update(c) { ctx = c; if (plot && across) draw(c); },
    unmount() { alive = false; hideTip(); },
  };
}
