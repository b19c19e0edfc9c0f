// Colour scales. All are colour-blind safe: attention uses single-hue ramps (white→blue for
// "as query", white→orange for "as key"), metrics use viridis, signed values use a blue–red
// diverging ramp with a white midpoint (ColorBrewer RdBu).

function lerpStops(stops, t) {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const a = stops[i];
  const b = stops[i + 1];
  return [0, 1, 2].map((j) => Math.round(a[j] + (b[j] - a[j]) * f));
}

const hex = (s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16));
const BLUES = ['#ffffff', '#deebf7', '#9ecae1', '#4292c6', '#08519c', '#08306b'].map(hex);
const ORANGES = ['#ffffff', '#fee6ce', '#fdae6b', '#f16913', '#b63b04', '#7f2704'].map(hex);
const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779',
  '#6ece58', '#b5de2b', '#fde725'].map(hex);
const RDBU = ['#2166ac', '#4393c3', '#92c5de', '#d1e5f0', '#f7f7f7', '#fddbc7', '#f4a582',
  '#d6604d', '#b2182b'].map(hex);

export const rgb = ([r, g, b]) => `rgb(${r},${g},${b})`;

/** Attention in [0, 1] → white→blue. */
export const blues = (t) => rgb(lerpStops(BLUES, t));
/** Attention in [0, 1] → white→orange. */
export const oranges = (t) => rgb(lerpStops(ORANGES, t));
/** Any value in [0, 1] → viridis. */
export const viridis = (t) => rgb(lerpStops(VIRIDIS, t));
/** Signed value in [-1, 1] → blue (negative) / white / red (positive). */
export const diverging = (t) => rgb(lerpStops(RDBU, (t + 1) / 2));

/** Black or white, whichever reads better on `cssRgb` (an "rgb(r,g,b)" string). */
export function textOn(cssRgb) {
  const m = String(cssRgb).match(/\d+/g);
  if (!m) return '#111';
  const [r, g, b] = m.map(Number);
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? '#111' : '#fff';
}

/** CSS linear-gradient for a colour bar of `scale` (t from 0 at `dir` start to 1). */
export function gradient(scale, dir = 'to right', n = 12, lo = 0) {
  const stops = [];
  for (let i = 0; i <= n; i++) stops.push(scale(lo + ((1 - lo) * i) / n));
  return `linear-gradient(${dir}, ${stops.join(',')})`;
}

export const HIGHLIGHT = '#e66100';
export const MUTED = '#b8bcc6';

/** Okabe–Ito categorical palette (colour-blind safe), for series in line and bar charts. */
export const CATEGORICAL = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#000000', '#F0E442'];
export const categorical = (i) => CATEGORICAL[i % CATEGORICAL.length];
