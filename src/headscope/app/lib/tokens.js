// Token rendering: visible whitespace, document-start markers, the interactive attention view
// used by head examples and custom text (hover shows attention, click picks a query/key pair),
// and an SVG re-draw of a token sequence for export.

import { h, fmt } from './dom.js';
import { blues, oranges, textOn } from './color.js';
import { showTip, hideTip } from './tooltip.js';
import { s, svgRoot, textWidth } from './svg.js';

const SPECIAL = /^<\|?[^<>]*\|?>$|^\[[A-Z]+\]$/;

// Control and zero-width characters (a byte-level vocabulary has a token for each) draw as
// nothing or as a missing-glyph box; they are shown as escapes, like the \xNN of partial UTF-8.
const INVISIBLE = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]/g;
const escapeInvisible = (t) => t.replace(/\r\n/g, '\n').replace(INVISIBLE, (c) => {
  const code = c.charCodeAt(0);
  return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
});

/**
 * How a token string is drawn, so that code reads like code: `pieces` are [text, kind] pairs
 * with kind `text`, `nl` (a ↵ marker for newlines), `br` (a line break inside the token) or
 * `indent` (the whitespace that starts the next line). A token with a newline breaks the line
 * there and the indentation after the newline opens the next line, inside the same span, so
 * it stays one hoverable token. A trailing newline's breaks (at most 2, so runs of blank lines
 * stay short) come after the span: `breaks`. `text` is the one-line form (SVG export, labels).
 */
export function displayToken(str) {
  const t = String(str ?? '');
  if (t === '') return { text: '∅', pieces: [['∅', 'text']], breaks: 0, cls: 'ws' };
  if (SPECIAL.test(t)) return { text: t, pieces: [[t, 'text']], breaks: 0, cls: 'special' };
  const e = escapeInvisible(t);
  const ws = /^[ \t\n]+$/.test(e);
  // Alone, a space-only token would be invisible: its spaces are shown as dots.
  const visible = (x) => (ws ? x.replace(/ /g, '·') : x).replace(/\t/g, '⇥');
  const chunks = e.split(/(\n+)/); // [line, newlines, line, newlines, …, line]
  const pieces = [];
  let breaks = 0;
  if (chunks[0]) pieces.push([visible(chunks[0]), 'text']);
  for (let c = 1; c < chunks.length; c += 2) {
    const n = Math.min(2, chunks[c].length);
    const rest = chunks.slice(c + 1).join('');
    pieces.push(['↵'.repeat(chunks[c].length), 'nl']);
    if (!rest) { breaks = n; break; }
    for (let b = 0; b < n; b++) pieces.push(['', 'br']);
    const line = chunks[c + 1];
    const indent = line.match(/^[ \t]*/)[0];
    // A tab shows as ⇥ and keeps the width of the 4 columns it indents by.
    if (indent) pieces.push([indent.replace(/\t/g, '⇥   '), 'indent']);
    if (line.length > indent.length) pieces.push([visible(line.slice(indent.length)), 'text']);
  }
  const text = pieces.filter(([, k]) => k !== 'br').map(([x, k]) => (k === 'indent' ? x.replace(/ /g, '·') : x)).join('');
  return { text, pieces, breaks, cls: ws ? 'ws' : '' };
}

/** The children of a token's span: a plain string for the common one-piece token. */
function tokenContent(d) {
  if (d.pieces.length === 1 && d.pieces[0][1] === 'text') return d.pieces[0][0];
  return d.pieces.map(([x, kind]) => {
    if (kind === 'br') return h('br');
    if (kind === 'text') return x;
    return h('span', { class: kind === 'nl' ? 'nl' : 'indent' }, x);
  });
}

/** A token as a one-line label for tables and tooltips: ␣ for edge spaces, ↵ for newlines. */
export function labelToken(str) {
  return escapeInvisible(String(str ?? ''))
    .replace(/\n/g, '↵').replace(/\t/g, '⇥')
    .replace(/^ +| +$/g, (m) => '␣'.repeat(m.length));
}

/** Index sparse [q, k, w] triples by query and by key. */
export function indexSparse(sparse) {
  const byQuery = new Map();
  const byKey = new Map();
  for (const [q, k, w] of sparse || []) {
    if (!byQuery.has(q)) byQuery.set(q, []);
    if (!byKey.has(k)) byKey.set(k, []);
    byQuery.get(q).push([k, w]);
    byKey.get(k).push([q, w]);
  }
  for (const m of [byQuery, byKey]) for (const v of m.values()) v.sort((a, b) => b[1] - a[1]);
  return { byQuery, byKey };
}

/**
 * Interactive token view. Colours each token by its max attention as a query (blue) or as a
 * key (orange); hovering a token outlines the keys it attends to (query mode) or the queries
 * attending to it (key mode), with intensity = weight; clicking picks a query then an
 * earlier-or-equal key and calls onSelect(q, k).
 */
export class TokenView {
  constructor({ strs, docStarts = [], maxAsQuery, maxAsKey, sparse, mode = 'query', onSelect = null, query = null, key = null }) {
    this.strs = strs;
    this.maxAsQuery = maxAsQuery;
    this.maxAsKey = maxAsKey;
    this.sparse = indexSparse(sparse);
    this.mode = mode;
    this.onSelect = onSelect;
    this.query = query;
    this.key = key;
    this.touched = [];
    this.el = h('div', {
      class: 'tokens', 'data-mode': mode, tabindex: 0, role: 'group',
      'aria-label': 'tokens: arrow keys move between tokens, Enter picks a query then a key',
    });
    const starts = new Set(docStarts);
    this.spans = strs.map((str, i) => {
      const d = displayToken(str);
      const span = h('span', { class: `tok ${d.cls}`, 'data-i': i }, tokenContent(d));
      if (starts.has(i)) {
        span.classList.add('doc-start');
        this.el.append(h('span', { class: 'doc-mark', title: `document starts at position ${i}`, 'aria-hidden': 'true' }, '¶'));
      }
      this.el.append(span);
      for (let b = 0; b < d.breaks; b++) this.el.append(h('br'));
      return span;
    });
    this.el.addEventListener('mouseover', (ev) => this.hover(ev));
    this.el.addEventListener('mousemove', (ev) => this.moveTip(ev));
    this.el.addEventListener('mouseleave', () => this.unhover());
    this.el.addEventListener('click', (ev) => this.click(ev));
    this.el.addEventListener('keydown', (ev) => this.onKeyDown(ev));
    this.el.addEventListener('blur', () => this.unhover());
    this.recolor();
    this.markSelection();
  }

  baseColor(i) {
    return this.mode === 'key' ? oranges(this.maxAsKey[i]) : blues(this.maxAsQuery[i]);
  }

  paint(i, bg) {
    const sp = this.spans[i];
    sp.style.backgroundColor = bg;
    sp.style.color = sp.classList.contains('ws') || sp.classList.contains('special') ? '' : textOn(bg);
  }

  recolor() {
    this.el.dataset.mode = this.mode;
    for (let i = 0; i < this.spans.length; i++) this.paint(i, this.baseColor(i));
  }

  setMode(mode) {
    if (mode === this.mode) return;
    this.unhover();
    this.mode = mode;
    this.recolor();
  }

  targets(i) {
    return (this.mode === 'key' ? this.sparse.byKey.get(i) : this.sparse.byQuery.get(i)) || [];
  }

  hover(ev) {
    const span = ev.target.closest('.tok');
    if (!span || !this.el.contains(span)) return;
    this.hoverIndex(Number(span.dataset.i), ev.clientX, ev.clientY);
  }

  /** Highlight what token i attends to (query mode) or receives from (key mode). */
  hoverIndex(i, x, y) {
    if (i === this.hovered) { this.tip(x, y); return; }
    this.unhover(false);
    this.hovered = i;
    const span = this.spans[i];
    span.classList.add('hovered');
    const scale = this.mode === 'key' ? blues : oranges;
    const cls = this.mode === 'key' ? 'hl-query' : 'hl-key';
    for (const [j, w] of this.targets(i)) {
      const sp = this.spans[j];
      if (!sp) continue;
      sp.classList.add(cls);
      sp.style.setProperty('--w', String(w));
      sp.style.outlineColor = `rgba(30, 30, 30, ${0.35 + 0.65 * Math.min(1, w)})`;
      this.paint(j, scale(0.15 + 0.85 * w));
      this.touched.push(j);
    }
    this.tip(x, y);
  }

  moveTip(ev) {
    if (this.hovered !== undefined && this.hovered !== null) this.tip(ev.clientX, ev.clientY);
  }

  tip(x, y) {
    const i = this.hovered;
    const list = this.targets(i).slice(0, 8);
    const isKey = this.mode === 'key';
    showTip([
      h('div', { class: 'tip-title' }, `“${labelToken(this.strs[i])}” · position ${i}`),
      h('div', {}, isKey ? `max attention as key ${fmt(this.maxAsKey[i], 3)}` : `max attention as query ${fmt(this.maxAsQuery[i], 3)}`),
      list.length
        ? h('table', { class: 'tip-table' },
          h('tr', {}, h('th', {}, isKey ? 'query' : 'key'), h('th', {}, 'pos'), h('th', {}, 'weight')),
          list.map(([j, w]) => h('tr', {}, h('td', {}, `“${labelToken(this.strs[j])}”`), h('td', { class: 'num' }, j), h('td', { class: 'num' }, fmt(w, 3)))))
        : h('div', { class: 'muted' }, isKey ? 'no query attends to it above the threshold' : 'no key above the threshold'),
    ], x, y);
  }

  unhover(hide = true) {
    for (const j of this.touched) {
      const sp = this.spans[j];
      sp.classList.remove('hl-key', 'hl-query');
      sp.style.removeProperty('--w');
      sp.style.outlineColor = '';
      this.paint(j, this.baseColor(j));
    }
    this.touched = [];
    if (this.hovered !== undefined && this.hovered !== null) this.spans[this.hovered]?.classList.remove('hovered');
    this.hovered = null;
    if (hide) hideTip();
  }

  click(ev) {
    const span = ev.target.closest('.tok');
    if (span) this.select(Number(span.dataset.i));
  }

  /** Keyboard: arrows move the highlighted token (like hovering), Enter / Space picks it. */
  onKeyDown(ev) {
    const n = this.spans.length;
    const cur = this.hovered ?? -1;
    let next = null;
    if (ev.key === 'ArrowRight') next = Math.min(n - 1, cur + 1);
    else if (ev.key === 'ArrowLeft') next = Math.max(0, cur < 0 ? n - 1 : cur - 1);
    else if (ev.key === 'Home') next = 0;
    else if (ev.key === 'End') next = n - 1;
    else if ((ev.key === 'Enter' || ev.key === ' ') && cur >= 0) {
      ev.preventDefault();
      this.select(cur);
      return;
    }
    if (next === null) return;
    ev.preventDefault();
    const r = this.spans[next].getBoundingClientRect();
    this.spans[next].scrollIntoView({ block: 'nearest' });
    this.hoverIndex(next, r.left + r.width / 2, r.bottom);
  }

  /** Pick token i: first a query, then an earlier-or-equal key (a later token restarts). */
  select(i) {
    if (!this.onSelect) return;
    if (this.query === null || this.key !== null) {
      this.query = i;
      this.key = null;
    } else if (i <= this.query) {
      this.key = i;
    } else {
      this.query = i;
    }
    this.markSelection();
    this.onSelect(this.query, this.key);
  }

  setSelection(q, k) {
    this.query = q ?? null;
    this.key = k ?? null;
    this.markSelection();
  }

  markSelection() {
    for (const sp of this.el.querySelectorAll('.sel-query, .sel-key')) sp.classList.remove('sel-query', 'sel-key');
    if (this.query !== null && this.spans[this.query]) this.spans[this.query].classList.add('sel-query');
    if (this.key !== null && this.spans[this.key]) this.spans[this.key].classList.add('sel-key');
  }

  /** SVG re-draw of the tokens with their current base colours. */
  toSVG(title = '', width = 900) {
    const px = 13;
    const lineH = 22;
    const pad = 10;
    const marks = [];
    let x = pad;
    let y = title ? 44 : 14;
    this.strs.forEach((str, i) => {
      const d = displayToken(str);
      const bg = this.baseColor(i);
      for (const [piece, kind] of d.pieces) {
        if (kind === 'br') { x = pad; y += lineH; continue; }
        const w = textWidth(piece, px) + (kind === 'text' ? 4 : 0);
        if (x + w > width - pad) { x = pad; y += lineH; }
        marks.push(s('rect', { x, y, width: w, height: lineH - 4, fill: bg, rx: 2 }));
        if (kind !== 'indent') {
          const fill = kind === 'nl' ? '#aab1bf' : d.cls ? '#777' : textOn(bg);
          marks.push(s('text', { x: x + (kind === 'text' ? 2 : 0), y: y + 13, 'font-size': px, fill, 'xml:space': 'preserve' }, piece));
        }
        x += w + (kind === 'text' ? 1 : 0);
      }
      if (d.breaks) { x = pad; y += lineH * d.breaks; }
    });
    const height = y + lineH + pad;
    return svgRoot(width, height, title ? s('text', { x: pad, y: 24, 'font-size': 14, 'font-weight': 600 }, title) : null, marks);
  }
}
