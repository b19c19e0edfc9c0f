// Names of attribution components (embed, pos_embed, L{l}H{h}, L{l}.mlp, bias, sae:L{l}/{i},
// sae:L{l}/error, sae:L{l}/b_dec) turned into readable labels and row kinds.

// The one parser of these labels on the JavaScript side (Python: Component.parse in
// analysis/components.py).

export const HEAD_RE = /^L(\d+)H(\d+)$/;
const LABEL_RE = /^(?:L(\d+)H(\d+)|L(\d+)\.mlp|sae:L(\d+)\/(\d+|b_dec|error))$/;

/** {kind, layer, index} of a label; kind is embed|pos_embed|bias|head|mlp|feature|b_dec|error,
 *  or null for a label that is none of these. */
export function parseComponent(label) {
  const c = String(label);
  if (c === 'embed' || c === 'pos_embed' || c === 'bias') return { kind: c, layer: null, index: null };
  const m = c.match(LABEL_RE);
  if (!m) return null;
  if (m[1] !== undefined) return { kind: 'head', layer: +m[1], index: +m[2] };
  if (m[3] !== undefined) return { kind: 'mlp', layer: +m[3], index: null };
  if (m[5] === 'b_dec' || m[5] === 'error') return { kind: m[5], layer: +m[4], index: null };
  return { kind: 'feature', layer: +m[4], index: +m[5] };
}

/** {text, kind, head?} where kind is embed|head|mlp|bias|error|feature|other. */
export function describeComponent(name, features = null) {
  const c = String(name);
  const p = parseComponent(c);
  if (!p) return { text: c, kind: 'other' };
  switch (p.kind) {
    case 'embed': return { text: 'token embedding', kind: 'embed' };
    case 'pos_embed': return { text: 'position embedding', kind: 'embed' };
    case 'bias': return { text: 'bias', kind: 'bias' };
    case 'head': return { text: c, kind: 'head', head: c };
    case 'mlp': return { text: `L${p.layer} MLP`, kind: 'mlp' };
    case 'error': return { text: `SAE error (L${p.layer})`, kind: 'error' };
    case 'b_dec': return { text: `SAE decoder bias (L${p.layer})`, kind: 'bias' };
    default: {
      const f = features && features[c];
      const lab = f && (f.label || f.description);
      return { text: lab ? `L${p.layer}/${p.index} · ${lab}` : `feature L${p.layer}/${p.index}`, kind: 'feature' };
    }
  }
}
