// Tiny DOM helpers shared by every view: element creation, formatting, the live-server note.

import { HEAD_RE } from './components.js';

/**
 * Create an HTML element. `attrs` keys starting with "on" become listeners, `class`/`style`
 * and `dataset` are handled, everything else is set as an attribute; children may be strings,
 * nodes, arrays, null or false (skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k === 'value' && 'value' in el) el.value = v;
    else if (k === 'checked' || k === 'selected' || k === 'open') el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

/** Format a number for display: 4 significant digits, integers as integers. */
export function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (typeof v !== 'number') return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toPrecision(digits).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
}

/** Fixed-decimals formatting, used where two numbers must be compared by eye (total vs score). */
export const fixed = (v, d = 4) => (v === null || v === undefined ? '–' : Number(v).toFixed(d));


/** Parse "L5H3" (case-insensitive, spaces ignored) into {layer, head, name}, or null. */
export function parseHead(text) {
  const m = String(text || '').trim().toUpperCase().replace(/\s+/g, '').match(HEAD_RE);
  return m ? { layer: +m[1], head: +m[2], name: `L${+m[1]}H${+m[2]}` } : null;
}

/**
 * The note shown by views that need `headscope serve` when the app is statically hosted (or
 * the server has no model: `serverWithoutModel`): one sentence saying what to run.
 */
export function needsServer(what, serverWithoutModel = false) {
  if (serverWithoutModel) {
    return h('div', { class: 'note needs-server' },
      h('strong', {}, `${what} needs a model`), ', and this server has none: restart it as ',
      h('code', {}, 'headscope serve RUN --model M'), '.');
  }
  return h('div', { class: 'note needs-server' },
    h('strong', {}, `${what} needs a live server`), ': run ', h('code', {}, 'headscope serve RUN --model M'),
    ' and open the URL it prints (everything precomputed in the run works without one: the head ',
    'selector, head pages, PCA, similar heads and precomputed attributions).');
}

export function errorBox(err) {
  return h('div', { class: 'note error', role: 'alert' }, String(err && err.message ? err.message : err));
}

export function loading(text = 'Loading…') {
  return h('div', { class: 'loading' }, text);
}

/** True when a key event comes from a text field (view shortcuts must not fire there). */
export function typingTarget(ev) {
  const t = ev.target;
  return t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || t.isContentEditable);
}

/** A labelled <select> built from [value, label] pairs (or plain values). */
export function select(options, value, onChange, attrs = {}) {
  const el = h('select', attrs,
    options.map((o) => {
      const [v, label, title] = Array.isArray(o) ? o : [o, o];
      return h('option', { value: v, selected: String(v) === String(value), title }, label);
    }));
  el.addEventListener('change', () => onChange(el.value));
  return el;
}
