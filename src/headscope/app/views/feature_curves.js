// Curves of the attention-features area: the (L0, FVE) sweep of the MTC and its two baselines
// (`headscope decompose sweep`) and the k-means cluster sizes of value-SAE head loadings beside
// the MTC's (`headscope decompose value-clusters`). Data: the `sweeps` and `clusters` lists of
// decompose/index.json (decompose/pages.py); nothing else is fetched.

import { h, fmt } from '../lib/dom.js';
import { s, svgRoot, linear, axes, lineChart } from '../lib/svg.js';
import { categorical } from '../lib/color.js';

const VARIANT = { mtc: 'MTC', single_head: 'single-head MTC', sae_mtc: 'SAE + single-head MTC' };

function sweepPanel(entry) {
  const sw = entry.sweep;
  const variants = [...new Set(sw.rows.map((r) => r.variant))];
  const series = variants.map((v, i) => {
    const rows = sw.rows.filter((r) => r.variant === v).sort((a, b) => a.l0 - b.l0);
    return { name: VARIANT[v] || v, x: rows.map((r) => r.l0), y: rows.map((r) => r.fve), color: categorical(i) };
  });
  const chart = lineChart({ series, width: 520, height: 300, xLabel: 'L0 (active features per token)', yLabel: 'FVE (held out)', xFormat: (v) => fmt(v, 3) });
  const opts = Object.entries(sw.options).map(([k, v]) => `${k} ${v}`).join(', ');
  const table = h('table', { class: 'data compact', style: { width: 'auto' } },
    h('thead', {}, h('tr', {}, h('th', {}, 'variant'), ...sw.values.map((l1) => h('th', { class: 'num' }, `L1 ${l1}`)))),
    h('tbody', {}, variants.map((v) => h('tr', {}, h('td', {}, VARIANT[v] || v),
      ...sw.values.map((l1) => {
        const r = sw.rows.find((x) => x.variant === v && x.l1 === l1);
        return h('td', { class: 'num', title: r ? `MSE ${fmt(r.mse, 4)} · dead ${fmt(r.dead_fraction, 2)} · ${fmt(r.seconds, 3)} s` : '' },
          r ? `L0 ${r.l0.toFixed(1)} · FVE ${r.fve.toFixed(3)}` : '–');
      })))));
  return h('section', { class: 'panel features-curves', 'data-sweep': entry.name },
    h('h3', {}, `(L0, FVE) of layer ${sw.layer}'s transcoders: ${entry.name}`),
    h('p', { class: 'muted small' }, `Each variant trained at ${sw.values.length} L1 coefficients on the same ${sw.train_tokens.toLocaleString()} tokens (${opts}); FVE of the ${sw.target === 'attn_out' ? 'attention output' : 'residual after the layer'} on ${sw.eval_tokens.toLocaleString()} held-out tokens. Up and to the left is better.`),
    chart, table);
}

const LOG_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];

/** Log-log chart of series [{name, x, y, color}] (all values > 0). */
function logLogChart({ series, width = 255, height = 220, xLabel = '', yLabel = '' }) {
  const xs0 = series.flatMap((d) => d.x);
  const ys0 = series.flatMap((d) => d.y);
  const lx = [Math.log10(Math.min(...xs0)) - 0.05, Math.log10(Math.max(...xs0, 2)) + 0.05];
  const ly = [Math.log10(Math.min(...ys0)) - 0.08, Math.log10(Math.max(...ys0)) + 0.08];
  const perRow = Math.max(1, Math.floor((width - 48) / 64));
  const legendH = 16 * Math.ceil(series.length / perRow);
  const area = { x0: 48, x1: width - 10, y0: 8 + legendH, y1: height - 40 };
  const xs = linear(lx, [area.x0, area.x1]);
  const ys = linear(ly, [area.y1, area.y0]);
  const ticks = ([lo, hi]) => {
    const t = LOG_TICKS.filter((v) => Math.log10(v) >= lo && Math.log10(v) <= hi);
    return (t.length > 6 ? t.filter((v) => /^1/.test(String(v))) : t).map(Math.log10);
  };
  const label = (v) => String(Math.round(10 ** v));
  const g = s('g', {});
  for (const d of series) {
    const pts = d.x.map((x, i) => [xs(Math.log10(x)), ys(Math.log10(d.y[i]))]);
    g.append(s('polyline', { points: pts.map((p) => p.map((v) => v.toFixed(1)).join(',')).join(' '), fill: 'none', stroke: d.color, 'stroke-width': 1.6 }));
    pts.forEach(([x, y], i) => g.append(s('circle', { cx: x, cy: y, r: 2.2, fill: d.color }, s('title', {}, `${d.name}: cluster ${d.x[i]} has ${d.y[i]} features`))));
  }
  const legend = s('g', {});
  series.forEach((d, i) => {
    const x = area.x0 + (i % perRow) * 64;
    const y = 12 + 16 * Math.floor(i / perRow);
    legend.append(s('rect', { x, y: y - 7, width: 12, height: 4, fill: d.color }));
    legend.append(s('text', { x: x + 16, y: y - 1, 'font-size': 11 }, d.name));
  });
  return svgRoot(width, height, axes(area, xs, ys, { xLabel, yLabel, xTicks: ticks(lx), yTicks: ticks(ly), xFormat: label, yFormat: label }), g, legend);
}

function clusterPanel(entry) {
  const c = entry.comparison;
  const ks = [...new Set(c.sets.flatMap((st) => st.clusters.map((cl) => cl.k)))].sort((a, b) => a - b);
  const color = (k) => categorical(ks.indexOf(k));
  const cards = c.sets.map((st) => {
    const series = st.clusters.map((cl) => {
      const sizes = cl.sizes.filter((x) => x > 0);
      return { name: `k = ${cl.k}`, x: sizes.map((_, i) => i + 1), y: sizes, color: color(cl.k) };
    });
    const slopes = Object.entries(st.loglog_slope).map(([k, v]) => `k ${k}: ${fmt(v, 2)}`).join(' · ');
    return h('figure', { class: 'cluster-card', 'data-source': st.source },
      h('figcaption', {}, h('strong', {}, st.name),
        h('div', { class: 'muted small' }, `${st.n_live} of ${st.n_features} features live · ${st.columns.length} loading columns`,
          st.fve !== null && st.fve !== undefined ? ` · L0 ${fmt(st.l0, 3)} · FVE ${fmt(st.fve, 3)}` : ''),
        slopes ? h('div', { class: 'muted small' }, `log-log slope ${slopes}`) : null),
      series.length ? logLogChart({ series, xLabel: 'cluster rank', yLabel: 'features in cluster' }) : h('p', { class: 'muted' }, 'Too few live features to cluster.'));
  });
  return h('section', { class: 'panel features-clusters', 'data-clusters': entry.name },
    h('h3', {}, `Head-loading cluster sizes, layer ${c.layer}: ${entry.name}`),
    h('p', { class: 'muted small' }, `k-means of each live feature's head-loading vector for each k (log-log: a power law is a straight line). MTC: |loading| over the layer's patterns and the identity; value SAEs: the norm of each head's slice of the decoder vector, as "Progress on Attention" defines it, per value head and read through each query head's OV map. ${c.train_tokens.toLocaleString()} training / ${c.eval_tokens.toLocaleString()} held-out tokens.`),
    h('div', { class: 'cluster-grid' }, cards));
}

/** The sweep and cluster panels of decompose/index.json, or null when it has neither. */
export function curvesSection(idx) {
  const sweeps = idx.sweeps || [];
  const clusters = idx.clusters || [];
  if (!sweeps.length && !clusters.length) return null;
  return h('div', { class: 'features-extra' }, sweeps.map(sweepPanel), clusters.map(clusterPanel));
}
