// SVG building blocks: element helper, linear scales, nice ticks, axes and the small charts
// (histogram, line chart, bar chart, heatmap) used across views. Charts return <svg> elements
// that are exported as-is by lib/export.js, so all styling is inline (no CSS classes needed).

export const SVG_NS = 'http://www.w3.org/2000/svg';
export const FONT = '-apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif';
const AXIS = '#555b66';
const GRID = '#e6e8ec';

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function svgRoot(width, height, ...children) {
  return s('svg', {
    xmlns: SVG_NS, width, height, viewBox: `0 0 ${width} ${height}`,
    'font-family': FONT, 'font-size': 12, fill: '#1d2330',
  }, s('rect', { x: 0, y: 0, width, height, fill: '#ffffff' }), ...children);
}

/** Linear map [d0, d1] → [r0, r1] with .invert; a degenerate domain maps to the middle. */
export function linear([d0, d1], [r0, r1]) {
  const span = d1 - d0;
  const f = (v) => (span === 0 ? (r0 + r1) / 2 : r0 + ((v - d0) / span) * (r1 - r0));
  f.invert = (p) => (r1 === r0 ? d0 : d0 + ((p - r0) / (r1 - r0)) * span);
  f.domain = [d0, d1];
  f.range = [r0, r1];
  return f;
}

/** Round tick values covering [lo, hi], about `count` of them. */
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (lo === hi) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Math.abs(v) < step * 1e-9 ? 0 : +v.toPrecision(12));
  }
  return out;
}

/** Pad a data extent so marks don't sit on the frame. */
export function extent(values, pad = 0.05) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo === Infinity) return [0, 1];
  if (lo === hi) return [lo - 0.5, hi + 0.5];
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

/**
 * A y domain for values read against zero (a curve of attention, of a logit attribution):
 * the data and 0, padded by `pad` of the span on each side that has data beyond 0, and at least
 * `minSpan` tall. All-positive data starts at 0, all-negative data ends at 0, data of both signs
 * puts 0 inside (lineChart then draws a zero line).
 */
export function zeroDomain(values, { pad = 0.08, minSpan = 0.05 } = {}) {
  let lo = 0;
  let hi = 0;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (hi - lo < minSpan) {
    if (hi === 0 && lo < 0) lo = -minSpan;
    else hi = lo + minSpan;
  }
  const p = (hi - lo) * pad;
  return [lo < 0 ? lo - p : lo, hi > 0 ? hi + p : hi];
}

export function tickLabel(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(0);
  return String(+v.toPrecision(4));
}

/**
 * A label function for evenly spaced `ticks` (from niceTicks): as many decimals as the step
 * needs, so neighbouring ticks never read the same (a metric spread over 0.1080–0.1083 gets
 * 0.10805, 0.1081, … rather than 0.108 three times).
 */
export function tickFormat(ticks) {
  if (ticks.length < 2) return tickLabel;
  const step = Math.abs(ticks[1] - ticks[0]);
  if (!(step > 0)) return tickLabel;
  const big = Math.max(...ticks.map(Math.abs));
  const decimals = (x) => {
    let d = 0;
    for (let y = x; d < 15 && (Math.round(y) === 0 || Math.abs(Math.round(y) - y) > 1e-6 * y); y *= 10) d++;
    return d;
  };
  const d = decimals(step);
  if (big < 1e5 && (big >= 1e-3 || d <= 5)) return (v) => String(+v.toFixed(d));
  // Very large or very small values: scientific notation with the digits the step needs.
  const e = Math.floor(Math.log10(step));
  const digits = Math.min(6, Math.max(0, Math.floor(Math.log10(big)) - e) + decimals(step / 10 ** e));
  return (v) => (v === 0 ? '0' : v.toExponential(digits));
}

let measureCtx = null;
/** Width in px of `text` drawn in `px`-sized FONT. */
export function textWidth(text, px = 12) {
  measureCtx = measureCtx || document.createElement('canvas').getContext('2d');
  measureCtx.font = `${px}px ${FONT}`;
  return measureCtx.measureText(text).width;
}

/** Truncate `text` with an ellipsis to fit `maxPx`. */
export function fitText(text, maxPx, px = 12) {
  if (textWidth(text, px) <= maxPx) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (textWidth(`${text.slice(0, mid)}…`, px) <= maxPx) lo = mid;
    else hi = mid - 1;
  }
  return `${text.slice(0, lo)}…`;
}

/** Axes with gridlines for a plot area {x0, x1, y0 (top), y1 (bottom)}. */
export function axes(area, xs, ys, { xLabel = '', yLabel = '', xTicks, yTicks, xFormat = null, yFormat = null } = {}) {
  const g = s('g', {});
  const xt = xTicks || niceTicks(xs.domain[0], xs.domain[1], Math.max(2, Math.floor((area.x1 - area.x0) / 70)));
  const yt = yTicks || niceTicks(ys.domain[0], ys.domain[1], Math.max(2, Math.floor((area.y1 - area.y0) / 40)));
  xFormat = xFormat || tickFormat(xt);
  yFormat = yFormat || tickFormat(yt);
  for (const v of yt) {
    const y = ys(v);
    if (y < area.y0 - 0.5 || y > area.y1 + 0.5) continue;
    g.append(s('line', { x1: area.x0, x2: area.x1, y1: y, y2: y, stroke: GRID }));
    g.append(s('text', { x: area.x0 - 6, y: y + 4, 'text-anchor': 'end', 'font-size': 11, fill: AXIS }, yFormat(v)));
  }
  for (const v of xt) {
    const x = xs(v);
    if (x < area.x0 - 0.5 || x > area.x1 + 0.5) continue;
    g.append(s('line', { x1: x, x2: x, y1: area.y1, y2: area.y1 + 4, stroke: AXIS }));
    g.append(s('text', { x, y: area.y1 + 16, 'text-anchor': 'middle', 'font-size': 11, fill: AXIS }, xFormat(v)));
  }
  g.append(s('line', { x1: area.x0, x2: area.x1, y1: area.y1, y2: area.y1, stroke: AXIS }));
  g.append(s('line', { x1: area.x0, x2: area.x0, y1: area.y0, y2: area.y1, stroke: AXIS }));
  if (xLabel) g.append(s('text', { x: (area.x0 + area.x1) / 2, y: area.y1 + 32, 'text-anchor': 'middle', 'font-size': 12, fill: '#1d2330' }, xLabel));
  if (yLabel) {
    const cy = (area.y0 + area.y1) / 2;
    g.append(s('text', { x: 14, y: cy, transform: `rotate(-90 14 ${cy})`, 'text-anchor': 'middle', 'font-size': 12, fill: '#1d2330' }, yLabel));
  }
  return g;
}

/** Histogram from bin edges and counts. */
export function histogram({ edges, counts, width = 320, height = 170, xLabel = '', yLabel = 'sequences', color = '#4292c6' }) {
  const area = { x0: 46, x1: width - 10, y0: 10, y1: height - 40 };
  const xs = linear([edges[0], edges[edges.length - 1]], [area.x0, area.x1]);
  const ys = linear([0, Math.max(1, ...counts)], [area.y1, area.y0]);
  const bars = counts.map((c, i) => s('rect', {
    x: xs(edges[i]) + 0.5, width: Math.max(0.5, xs(edges[i + 1]) - xs(edges[i]) - 1),
    y: ys(c), height: area.y1 - ys(c), fill: color,
  }, s('title', {}, `${tickLabel(edges[i])}–${tickLabel(edges[i + 1])}: ${c}`)));
  const yTicks = niceTicks(0, Math.max(1, ...counts), 4).filter((v) => Number.isInteger(v));
  return svgRoot(width, height, axes(area, xs, ys, { xLabel, yLabel, yTicks }), bars);
}

/**
 * Line chart of one or more series [{name, x: [], y: [], color}]; a legend is drawn when there
 * is more than one series. A dashed zero line is drawn when 0 lies above the bottom of the y
 * domain (negative values). The plot box and the zero line carry data-role attributes
 * ("plot-area", "zero-line") so tests can find them.
 */
export function lineChart({ series, width = 320, height = 170, xLabel = '', yLabel = '', yDomain, xTicks, xFormat, dots = true }) {
  const legendH = series.length > 1 ? 18 * Math.ceil(series.length / Math.max(1, Math.floor((width - 60) / 110))) : 0;
  const area = { x0: 52, x1: width - 12, y0: 10 + legendH, y1: height - 40 };
  const xs = linear(extent(series.flatMap((d) => d.x), 0.02), [area.x0, area.x1]);
  const ys = linear(yDomain || extent(series.flatMap((d) => d.y), 0.08), [area.y1, area.y0]);
  const g = s('g', {});
  g.append(s('rect', { x: area.x0, y: area.y0, width: area.x1 - area.x0, height: area.y1 - area.y0, fill: 'none', 'pointer-events': 'none', 'data-role': 'plot-area' }));
  if (ys.domain[0] < 0 && ys.domain[1] >= 0) {
    const y0 = ys(0);
    g.append(s('line', { x1: area.x0, x2: area.x1, y1: y0, y2: y0, stroke: AXIS, 'stroke-dasharray': '4 3', 'data-role': 'zero-line' }));
  }
  for (const d of series) {
    const pts = d.x.map((x, i) => [xs(x), ys(d.y[i])]).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    g.append(s('polyline', { points: pts.map((p) => p.map((v) => v.toFixed(1)).join(',')).join(' '), fill: 'none', stroke: d.color, 'stroke-width': 1.8 }));
    if (dots && pts.length <= 60) {
      pts.forEach(([x, y], i) => g.append(s('circle', { cx: x, cy: y, r: 2.8, fill: d.color },
        s('title', {}, `${d.name}: ${xFormat ? xFormat(d.x[i]) : d.x[i]} → ${tickLabel(d.y[i])}`))));
    }
  }
  const legend = s('g', {});
  if (series.length > 1) {
    let lx = area.x0;
    let ly = 10;
    for (const d of series) {
      const w = 24 + textWidth(d.name, 11) + 14;
      if (lx + w > width - 8) { lx = area.x0; ly += 18; }
      legend.append(s('rect', { x: lx, y: ly - 8, width: 14, height: 4, fill: d.color }));
      legend.append(s('text', { x: lx + 18, y: ly - 2, 'font-size': 11 }, d.name));
      lx += w;
    }
  }
  return svgRoot(width, height, axes(area, xs, ys, { xLabel, yLabel, xTicks, xFormat }), g, legend);
}

/** Grouped vertical bar chart: categories on x, one bar per series. */
export function barChart({ categories, series, width = 480, height = 220, yLabel = '', yDomain }) {
  const maxLabel = Math.max(...categories.map((c) => textWidth(c, 11)), 10);
  const rotate = maxLabel > (width - 70) / Math.max(1, categories.length) - 4;
  const bottom = rotate ? Math.min(120, maxLabel * 0.72 + 24) : 40;
  const area = { x0: 52, x1: width - 12, y0: series.length > 1 ? 28 : 10, y1: height - bottom };
  const all = series.flatMap((d) => d.values);
  const ys = linear(yDomain || [Math.min(0, ...all), Math.max(1e-9, ...all) * 1.05], [area.y1, area.y0]);
  const band = (area.x1 - area.x0) / Math.max(1, categories.length);
  const bw = Math.max(1, (band * 0.8) / series.length);
  const xs = linear([0, 1], [area.x0, area.x1]);
  const g = s('g', {});
  categories.forEach((c, i) => {
    series.forEach((d, j) => {
      const v = d.values[i];
      const y = ys(Math.max(0, v));
      g.append(s('rect', { x: area.x0 + band * i + band * 0.1 + bw * j, y, width: bw, height: Math.abs(ys(v) - ys(0)), fill: d.color },
        s('title', {}, `${d.name} · ${c}: ${tickLabel(v)}`)));
    });
    const x = area.x0 + band * (i + 0.5);
    const label = fitText(c, 110, 11);
    g.append(rotate
      ? s('text', { x, y: area.y1 + 10, transform: `rotate(-50 ${x} ${area.y1 + 10})`, 'text-anchor': 'end', 'font-size': 11, fill: AXIS }, label)
      : s('text', { x, y: area.y1 + 16, 'text-anchor': 'middle', 'font-size': 11, fill: AXIS }, label));
  });
  const ax = axes(area, xs, ys, { yLabel, xTicks: [] });
  const legend = s('g', {});
  if (series.length > 1) {
    let lx = area.x0;
    for (const d of series) {
      legend.append(s('rect', { x: lx, y: 8, width: 10, height: 10, fill: d.color }));
      legend.append(s('text', { x: lx + 14, y: 17, 'font-size': 11 }, d.name));
      lx += 28 + textWidth(d.name, 11);
    }
  }
  return svgRoot(width, height, ax, g, legend);
}

/**
 * Heatmap of `matrix` (rows × cols) with row/column labels, coloured by `scale(value)`.
 * Labels are truncated to fit; full labels and values are in <title> tooltips.
 */
export function heatmap({ matrix, rowLabels, colLabels, scale, title = '', cell = 22, labelPx = 140, format = tickLabel, showValues = true }) {
  const rows = matrix.length;
  const cols = rows ? matrix[0].length : 0;
  const top = 28 + labelPx * 0.75;
  const left = labelPx + 8;
  // Column labels are rotated 45° up and to the right of their cell: leave room for them.
  const width = Math.max(left + cols * cell + Math.ceil(labelPx * 0.72) + 8, title ? textWidth(title, 13) + 24 : 0);
  const height = top + rows * cell + 12;
  const g = s('g', {});
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const v = matrix[i][j];
      const fill = scale(v);
      g.append(s('rect', { x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1, fill },
        s('title', {}, `${rowLabels[i]} × ${colLabels[j]}: ${format(v)}`)));
      if (showValues && cell >= 26) {
        const m = String(fill).match(/\d+/g).map(Number);
        const light = 0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2] > 150;
        g.append(s('text', { x: left + j * cell + cell / 2, y: top + i * cell + cell / 2 + 3.5, 'text-anchor': 'middle', 'font-size': 9.5, fill: light ? '#111' : '#fff', 'pointer-events': 'none' }, Number(v).toFixed(2)));
      }
    }
  }
  for (let i = 0; i < rows; i++) {
    g.append(s('text', { x: left - 6, y: top + i * cell + cell / 2 + 4, 'text-anchor': 'end', 'font-size': 11 }, fitText(rowLabels[i], labelPx - 4, 11), s('title', {}, rowLabels[i])));
  }
  for (let j = 0; j < cols; j++) {
    const x = left + j * cell + cell / 2 + 4;
    g.append(s('text', { x, y: top - 6, transform: `rotate(-45 ${x} ${top - 6})`, 'font-size': 11 }, fitText(colLabels[j], labelPx * 0.95, 11), s('title', {}, colLabels[j])));
  }
  const t = title ? s('text', { x: 8, y: 17, 'font-size': 13, 'font-weight': 600 }, title) : null;
  return svgRoot(width, height, t, g);
}

/** Horizontal colour legend for `scale` on [lo, hi]. */
export function colorLegend({ scale, lo, hi, label = '', width = 220 }) {
  const id = `grad${Math.random().toString(36).slice(2, 8)}`;
  const stops = [];
  for (let i = 0; i <= 10; i++) stops.push(s('stop', { offset: `${i * 10}%`, 'stop-color': scale(lo + ((hi - lo) * i) / 10) }));
  const ticks = niceTicks(lo, hi, 4);
  const tickText = tickFormat(ticks);
  const xs = linear([lo, hi], [10, width - 10]);
  return svgRoot(width, 46,
    s('defs', {}, s('linearGradient', { id }, stops)),
    s('text', { x: 10, y: 12, 'font-size': 11 }, label),
    s('rect', { x: 10, y: 17, width: width - 20, height: 10, fill: `url(#${id})`, stroke: '#ccc' }),
    ticks.map((v) => s('text', { x: xs(v), y: 40, 'text-anchor': 'middle', 'font-size': 10, fill: AXIS }, tickText(v))));
}
