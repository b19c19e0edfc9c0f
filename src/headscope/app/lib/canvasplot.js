// Canvas scatter plot shared by the head selector, the PCA view and the head map. Marks live in
// a uniform grid spatial index (cell = 16 CSS px), so finding the mark under the pointer looks at
// 9 cells whatever the number of heads. Hover rings are drawn on an overlay canvas so moving the
// pointer never redraws the marks. toSVG() re-draws the same marks as SVG for export.

import { h } from './dom.js';
import { s, svgRoot, linear, niceTicks, tickFormat, extent, FONT, textWidth, fitText } from './svg.js';

const CELL = 16;
const PICK_PX = 9;

export class ScatterPlot {
  /**
   * @param {object} o
   * @param {number} o.width CSS px
   * @param {number} o.height CSS px
   * @param {(i:number, ev:MouseEvent)=>void} [o.onHover] called with -1 when leaving marks
   * @param {(i:number, ev:MouseEvent)=>void} [o.onClick]
   */
  constructor({ width = 800, height = 500, onHover = null, onClick = null, ariaLabel = 'scatter plot' }) {
    this.width = width;
    this.height = height;
    this.onHover = onHover;
    this.onClick = onClick;
    this.canvas = h('canvas', { class: 'plot-base', role: 'img', 'aria-label': ariaLabel });
    this.overlay = h('canvas', { class: 'plot-overlay' });
    this.el = h('div', { class: 'plot' }, this.canvas, this.overlay);
    this.hovered = -1;
    this.n = 0;
    this.overlay.addEventListener('mousemove', (ev) => this.move(ev));
    this.overlay.addEventListener('mouseleave', (ev) => { this.setHover(-1); if (this.onHover) this.onHover(-1, ev); });
    this.overlay.addEventListener('click', (ev) => {
      const i = this.pickEvent(ev);
      if (i >= 0 && this.onClick) this.onClick(i, ev);
    });
    this.resize(width, height);
  }

  resize(width, height = this.height) {
    this.width = width;
    this.height = height;
    const dpr = window.devicePixelRatio || 1;
    for (const c of [this.canvas, this.overlay]) {
      c.width = Math.round(width * dpr);
      c.height = Math.round(height * dpr);
      c.style.width = `${width}px`;
      c.style.height = `${height}px`;
    }
    this.el.style.width = `${width}px`;
    this.el.style.height = `${height}px`;
    this.dpr = dpr;
    if (this.data) this.draw();
  }

  /**
   * @param {object} d
   * @param {ArrayLike<number>} d.x
   * @param {ArrayLike<number>} d.y
   * @param {string[]|null} d.colors CSS colour per mark
   * @param {number[]} [d.order] draw order (later on top); default index order
   * @param {Set<number>|null} [d.emphasis] marks drawn larger with a dark outline
   * @param {{scale:(t:number)=>string, lo:number, hi:number, label:string}|null} [d.colorBar]
   * @param {{label:string,color:string}[]|null} [d.legend] categorical legend
   */
  setData(d) {
    this.data = d;
    this.n = d.x.length;
    this.draw();
  }

  layout() {
    const d = this.data;
    const right = d.colorBar ? 92 : d.legend ? 12 + Math.min(180, Math.max(...d.legend.map((l) => textWidth(l.label, 12))) + 28) : 16;
    const area = { x0: 62, x1: this.width - right, y0: 14, y1: this.height - 48 };
    const xs = linear(d.xDomain || extent(d.x, 0.04), [area.x0, area.x1]);
    const ys = linear(d.yDomain || extent(d.y, 0.06), [area.y1, area.y0]);
    return { area, xs, ys };
  }

  draw() {
    const d = this.data;
    const { area, xs, ys } = this.layout();
    this.area = area;
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, this.width, this.height);
    this.drawAxes(ctx, area, xs, ys, d);

    const n = this.n;
    const px = new Float32Array(n);
    const py = new Float32Array(n);
    const cols = Math.ceil(this.width / CELL) + 1;
    const rows = Math.ceil(this.height / CELL) + 1;
    const grid = new Array(cols * rows);
    for (let i = 0; i < n; i++) {
      px[i] = xs(d.x[i]);
      py[i] = ys(d.y[i]);
      const c = Math.floor(px[i] / CELL);
      const r = Math.floor(py[i] / CELL);
      if (c < 0 || r < 0 || c >= cols || r >= rows || !Number.isFinite(px[i]) || !Number.isFinite(py[i])) continue;
      const key = r * cols + c;
      (grid[key] || (grid[key] = [])).push(i);
    }
    this.px = px;
    this.py = py;
    this.grid = { cells: grid, cols, rows };

    const radius = this.radius();
    const order = d.order || Array.from({ length: n }, (_, i) => i);
    ctx.save();
    ctx.beginPath();
    ctx.rect(area.x0 - radius, area.y0 - radius, area.x1 - area.x0 + 2 * radius, area.y1 - area.y0 + 2 * radius);
    ctx.clip();
    ctx.lineWidth = 0.6;
    ctx.strokeStyle = 'rgba(20,20,30,0.45)';
    for (const i of order) {
      const big = d.emphasis && d.emphasis.has(i);
      ctx.beginPath();
      ctx.arc(px[i], py[i], big ? radius + 2.5 : radius, 0, Math.PI * 2);
      ctx.fillStyle = d.colors ? d.colors[i] : '#4c72b0';
      ctx.fill();
      if (big) { ctx.lineWidth = 2; ctx.strokeStyle = '#111'; ctx.stroke(); ctx.lineWidth = 0.6; ctx.strokeStyle = 'rgba(20,20,30,0.45)'; } else if (n < 3000) ctx.stroke();
    }
    ctx.restore();
    this.setHover(this.hovered, true);
  }

  radius() {
    const a = this.area ? (this.area.x1 - this.area.x0) * (this.area.y1 - this.area.y0) : 1e5;
    return Math.max(2.2, Math.min(6, Math.sqrt(a / Math.max(1, this.n)) / 4));
  }

  drawAxes(ctx, area, xs, ys, d) {
    ctx.font = `11px ${FONT}`;
    ctx.fillStyle = '#555b66';
    ctx.strokeStyle = '#e6e8ec';
    ctx.lineWidth = 1;
    const xt = d.xTicks || niceTicks(xs.domain[0], xs.domain[1], Math.max(2, Math.floor((area.x1 - area.x0) / 70)));
    const yt = d.yTicks || niceTicks(ys.domain[0], ys.domain[1], Math.max(2, Math.floor((area.y1 - area.y0) / 40)));
    const xLab = tickFormat(xt);
    const yLab = tickFormat(yt);
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const v of yt) {
      const y = Math.round(ys(v)) + 0.5;
      if (y < area.y0 - 1 || y > area.y1 + 1) continue;
      ctx.beginPath(); ctx.moveTo(area.x0, y); ctx.lineTo(area.x1, y); ctx.stroke();
      ctx.fillText(yLab(v), area.x0 - 6, y);
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (const v of xt) {
      const x = Math.round(xs(v)) + 0.5;
      if (x < area.x0 - 1 || x > area.x1 + 1) continue;
      ctx.beginPath(); ctx.moveTo(x, area.y0); ctx.lineTo(x, area.y1); ctx.stroke();
      ctx.fillText(xLab(v), x, area.y1 + 6);
    }
    ctx.strokeStyle = '#555b66';
    ctx.beginPath(); ctx.moveTo(area.x0, area.y0); ctx.lineTo(area.x0, area.y1); ctx.lineTo(area.x1, area.y1); ctx.stroke();
    ctx.fillStyle = '#1d2330';
    ctx.font = `12px ${FONT}`;
    ctx.fillText(d.xLabel || '', (area.x0 + area.x1) / 2, area.y1 + 26);
    ctx.save();
    ctx.translate(16, (area.y0 + area.y1) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = 'middle';
    ctx.fillText(d.yLabel || '', 0, 0);
    ctx.restore();
    if (d.colorBar) this.drawColorBar(ctx, area, d.colorBar);
    if (d.legend) this.drawLegend(ctx, area, d.legend);
  }

  colorBarGeometry(area) {
    return { x: area.x1 + 26, y0: area.y0 + 4, y1: area.y1, w: 12 };
  }

  drawColorBar(ctx, area, cb) {
    const g = this.colorBarGeometry(area);
    const steps = 64;
    for (let i = 0; i < steps; i++) {
      ctx.fillStyle = cb.scale(1 - i / (steps - 1));
      ctx.fillRect(g.x, g.y0 + ((g.y1 - g.y0) * i) / steps, g.w, (g.y1 - g.y0) / steps + 1);
    }
    ctx.strokeStyle = '#999';
    ctx.strokeRect(g.x + 0.5, g.y0 + 0.5, g.w, g.y1 - g.y0);
    const ys = linear([cb.lo, cb.hi], [g.y1, g.y0]);
    ctx.fillStyle = '#555b66';
    ctx.font = `10px ${FONT}`;
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    const cbTicks = niceTicks(cb.lo, cb.hi, 5);
    const cbLab = tickFormat(cbTicks);
    for (const v of cbTicks) ctx.fillText(cbLab(v), g.x + g.w + 4, ys(v));
    ctx.save();
    ctx.translate(g.x - 8, (g.y0 + g.y1) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = 'center';
    ctx.fillStyle = '#1d2330';
    ctx.font = `11px ${FONT}`;
    ctx.fillText(fitText(cb.label, g.y1 - g.y0, 11), 0, 0);
    ctx.restore();
  }

  drawLegend(ctx, area, legend) {
    ctx.font = `12px ${FONT}`;
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    legend.forEach((l, i) => {
      const y = area.y0 + 8 + i * 18;
      ctx.fillStyle = l.color;
      ctx.beginPath(); ctx.arc(area.x1 + 20, y, 5, 0, Math.PI * 2); ctx.fill();
      ctx.fillStyle = '#1d2330';
      ctx.fillText(fitText(l.label, 160, 12), area.x1 + 30, y);
    });
  }

  /** Index of the mark nearest to canvas point (x, y) within PICK_PX, or -1. O(1): 9 cells. */
  pick(x, y) {
    if (!this.grid) return -1;
    const { cells, cols, rows } = this.grid;
    const c0 = Math.floor(x / CELL);
    const r0 = Math.floor(y / CELL);
    let best = -1;
    let bestD = PICK_PX * PICK_PX + this.radius() ** 2;
    for (let r = r0 - 1; r <= r0 + 1; r++) {
      if (r < 0 || r >= rows) continue;
      for (let c = c0 - 1; c <= c0 + 1; c++) {
        if (c < 0 || c >= cols) continue;
        const list = cells[r * cols + c];
        if (!list) continue;
        for (const i of list) {
          const dx = this.px[i] - x;
          const dy = this.py[i] - y;
          const dd = dx * dx + dy * dy;
          if (dd <= bestD) { bestD = dd; best = i; }
        }
      }
    }
    return best;
  }

  pickEvent(ev) {
    const r = this.overlay.getBoundingClientRect();
    return this.pick(ev.clientX - r.left, ev.clientY - r.top);
  }

  move(ev) {
    this.moveStart = performance.now();
    const i = this.pickEvent(ev);
    this.setHover(i);
    this.overlay.style.cursor = i >= 0 && this.onClick ? 'pointer' : 'default';
    if (this.onHover) this.onHover(i, ev);
  }

  /**
   * Draw the hover ring for mark i (black) and rings for the persistent `linked` marks
   * (orange; pass a list to replace them, omit to keep them) on the overlay.
   */
  setHover(i, force = false, linked = undefined) {
    if (linked !== undefined) this.linked = linked;
    if (i === this.hovered && !force && linked === undefined) return;
    this.hovered = i;
    const ctx = this.overlay.getContext('2d');
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    const ring = (j, color, width) => {
      ctx.beginPath();
      ctx.arc(this.px[j], this.py[j], this.radius() + 3.5, 0, Math.PI * 2);
      ctx.lineWidth = width;
      ctx.strokeStyle = color;
      ctx.stroke();
    };
    for (const j of this.linked || []) if (j >= 0 && j < this.n) ring(j, '#e66100', 2);
    if (i >= 0 && i < this.n) {
      ring(i, '#111', 2.5);
      ctx.beginPath();
      ctx.arc(this.px[i], this.py[i], this.radius() + 5, 0, Math.PI * 2);
      ctx.lineWidth = 1;
      ctx.strokeStyle = '#fff';
      ctx.stroke();
    }
  }

  /** Mark centres in CSS px relative to the canvas. */
  positions() {
    return Array.from({ length: this.n }, (_, i) => [this.px[i], this.py[i]]);
  }

  /** Mark centres in viewport coordinates (what a pointer event would carry). */
  clientPositions() {
    const r = this.overlay.getBoundingClientRect();
    return Array.from({ length: this.n }, (_, i) => [r.left + this.px[i], r.top + this.py[i]]);
  }

  toSVG(title = '') {
    const d = this.data;
    const { area, xs, ys } = this.layout();
    const top = title ? 26 : 0;
    const g = s('g', { transform: `translate(0 ${top})` });
    const axisG = s('g', {});
    const xt = d.xTicks || niceTicks(xs.domain[0], xs.domain[1], Math.max(2, Math.floor((area.x1 - area.x0) / 70)));
    const yt = d.yTicks || niceTicks(ys.domain[0], ys.domain[1], Math.max(2, Math.floor((area.y1 - area.y0) / 40)));
    const xLab = tickFormat(xt);
    const yLab = tickFormat(yt);
    for (const v of yt) {
      const y = ys(v);
      if (y < area.y0 - 1 || y > area.y1 + 1) continue;
      axisG.append(s('line', { x1: area.x0, x2: area.x1, y1: y, y2: y, stroke: '#e6e8ec' }));
      axisG.append(s('text', { x: area.x0 - 6, y: y + 4, 'text-anchor': 'end', 'font-size': 11, fill: '#555b66' }, yLab(v)));
    }
    for (const v of xt) {
      const x = xs(v);
      if (x < area.x0 - 1 || x > area.x1 + 1) continue;
      axisG.append(s('line', { x1: x, x2: x, y1: area.y0, y2: area.y1, stroke: '#e6e8ec' }));
      axisG.append(s('text', { x, y: area.y1 + 17, 'text-anchor': 'middle', 'font-size': 11, fill: '#555b66' }, xLab(v)));
    }
    axisG.append(s('path', { d: `M${area.x0},${area.y0}V${area.y1}H${area.x1}`, fill: 'none', stroke: '#555b66' }));
    axisG.append(s('text', { x: (area.x0 + area.x1) / 2, y: area.y1 + 38, 'text-anchor': 'middle' }, d.xLabel || ''));
    const cy = (area.y0 + area.y1) / 2;
    axisG.append(s('text', { x: 16, y: cy, transform: `rotate(-90 16 ${cy})`, 'text-anchor': 'middle' }, d.yLabel || ''));
    g.append(axisG);
    const radius = this.radius();
    const order = d.order || Array.from({ length: this.n }, (_, i) => i);
    const marks = s('g', { stroke: 'rgba(20,20,30,0.45)', 'stroke-width': 0.6 });
    for (const i of order) {
      const big = d.emphasis && d.emphasis.has(i);
      marks.append(s('circle', {
        cx: xs(d.x[i]).toFixed(2), cy: ys(d.y[i]).toFixed(2), r: big ? radius + 2.5 : radius,
        fill: d.colors ? d.colors[i] : '#4c72b0', stroke: big ? '#111' : null, 'stroke-width': big ? 2 : null,
      }, d.labels ? s('title', {}, d.labels[i]) : null));
    }
    g.append(marks);
    if (d.colorBar) {
      const cb = d.colorBar;
      const geo = this.colorBarGeometry(area);
      const id = `cb${Math.random().toString(36).slice(2, 8)}`;
      const stops = [];
      for (let k = 0; k <= 10; k++) stops.push(s('stop', { offset: `${k * 10}%`, 'stop-color': cb.scale(1 - k / 10) }));
      g.append(s('defs', {}, s('linearGradient', { id, x1: 0, y1: 0, x2: 0, y2: 1 }, stops)));
      g.append(s('rect', { x: geo.x, y: geo.y0, width: geo.w, height: geo.y1 - geo.y0, fill: `url(#${id})`, stroke: '#999' }));
      const cys = linear([cb.lo, cb.hi], [geo.y1, geo.y0]);
      const cbTicks = niceTicks(cb.lo, cb.hi, 5);
      const cbLab = tickFormat(cbTicks);
      for (const v of cbTicks) g.append(s('text', { x: geo.x + geo.w + 4, y: cys(v) + 3.5, 'font-size': 10, fill: '#555b66' }, cbLab(v)));
      const my = (geo.y0 + geo.y1) / 2;
      g.append(s('text', { x: geo.x - 8, y: my, transform: `rotate(-90 ${geo.x - 8} ${my})`, 'text-anchor': 'middle', 'font-size': 11 }, cb.label));
    }
    if (d.legend) {
      d.legend.forEach((l, k) => {
        const y = area.y0 + 8 + k * 18;
        g.append(s('circle', { cx: area.x1 + 20, cy: y, r: 5, fill: l.color }));
        g.append(s('text', { x: area.x1 + 30, y: y + 4 }, l.label));
      });
    }
    return svgRoot(this.width, this.height + top,
      title ? s('text', { x: 10, y: 18, 'font-size': 14, 'font-weight': 600 }, title) : null, g);
  }
}
