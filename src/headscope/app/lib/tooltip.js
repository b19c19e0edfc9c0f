// The one floating tooltip (#tooltip in index.html), positioned next to the pointer and kept
// inside the viewport.

import { append, clear } from './dom.js';

let tip = null;

function el() {
  tip = tip || document.getElementById('tooltip');
  return tip;
}

/** Show `content` (nodes or strings) near client point (x, y). */
export function showTip(content, x, y) {
  const t = el();
  if (!t) return;
  clear(t);
  append(t, [content]);
  t.hidden = false;
  const r = t.getBoundingClientRect();
  let left = x + 14;
  let top = y + 14;
  if (left + r.width > window.innerWidth - 4) left = Math.max(4, x - r.width - 14);
  if (top + r.height > window.innerHeight - 4) top = Math.max(4, y - r.height - 14);
  t.style.left = `${left}px`;
  t.style.top = `${top}px`;
}

export function hideTip() {
  const t = el();
  if (t) t.hidden = true;
}
