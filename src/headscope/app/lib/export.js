// PNG / SVG export. Every figure gets a pair of buttons; SVG figures are serialised as they
// are, canvas figures export their canvas for PNG and provide an SVG re-draw of their marks.

import { h } from './dom.js';

function download(href, filename) {
  const a = h('a', { href, download: filename, style: 'display:none' });
  document.body.append(a);
  a.click();
  a.remove();
}

export function svgString(svgEl) {
  const clone = svgEl.cloneNode(true);
  clone.setAttribute('xmlns', 'http://www.w3.org/2000/svg');
  return `<?xml version="1.0" encoding="UTF-8"?>\n${new XMLSerializer().serializeToString(clone)}`;
}

export function downloadSVG(svgEl, filename) {
  const blob = new Blob([svgString(svgEl)], { type: 'image/svg+xml' });
  const url = URL.createObjectURL(blob);
  download(url, filename);
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** Rasterise an <svg> element at 2× into a canvas. */
export function svgToCanvas(svgEl, scale = 2) {
  const w = Number(svgEl.getAttribute('width')) || svgEl.getBoundingClientRect().width;
  const hgt = Number(svgEl.getAttribute('height')) || svgEl.getBoundingClientRect().height;
  const img = new Image();
  const url = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(svgString(svgEl))}`;
  return new Promise((resolve, reject) => {
    img.onload = () => {
      const c = document.createElement('canvas');
      c.width = Math.ceil(w * scale);
      c.height = Math.ceil(hgt * scale);
      const ctx = c.getContext('2d');
      ctx.fillStyle = '#fff';
      ctx.fillRect(0, 0, c.width, c.height);
      ctx.drawImage(img, 0, 0, c.width, c.height);
      resolve(c);
    };
    img.onerror = () => reject(new Error('could not rasterise the SVG'));
    img.src = url;
  });
}

/**
 * "PNG" and "SVG" buttons for one figure. `svg()` returns an <svg> element (built on demand);
 * `png()` (optional) returns a canvas or a promise of one; without it the SVG is rasterised.
 */
export function exportButtons(name, { svg, png }) {
  const safe = String(name).replace(/[^\w.-]+/g, '_');
  const onPng = async () => {
    const canvas = png ? await png() : await svgToCanvas(svg());
    download(canvas.toDataURL('image/png'), `${safe}.png`);
  };
  return h('span', { class: 'export' },
    h('button', { type: 'button', class: 'small', title: `Download ${name} as PNG`, onclick: onPng }, 'PNG'),
    h('button', { type: 'button', class: 'small', title: `Download ${name} as SVG`, onclick: () => downloadSVG(svg(), `${safe}.svg`) }, 'SVG'));
}
