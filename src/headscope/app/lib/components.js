// Names of attribution components (embed, pos_embed, L{l}H{h}, L{l}.mlp, bias, sae:L{l}/{i},
// sae:L{l}/error, sae:L{l}/b_dec) turned into readable labels and row kinds.

const SAE_RE = /^sae:L(\d+)\/(\d+|error|b_dec)$/;

/** {text, kind, head?} where kind is embed|head|mlp|bias|error|feature|other. */
export function describeComponent(name, features = null) {
  const c = String(name);
  if (c === 'embed') return { text: 'token embedding', kind: 'embed' };
  if (c === 'pos_embed') return { text: 'position embedding', kind: 'embed' };
  if (c === 'bias') return { text: 'bias', kind: 'bias' };
  let m = c.match(/^L(\d+)H(\d+)$/);
  if (m) return { text: c, kind: 'head', head: c };
  m = c.match(/^L(\d+)\.mlp$/);
  if (m) return { text: `L${m[1]} MLP`, kind: 'mlp' };
  m = c.match(SAE_RE);
  if (m) {
    if (m[2] === 'error') return { text: `SAE error (L${m[1]})`, kind: 'error' };
    if (m[2] === 'b_dec') return { text: `SAE decoder bias (L${m[1]})`, kind: 'bias' };
    const f = features && features[c];
    const lab = f && (f.label || f.description);
    return { text: lab ? `L${m[1]}/${m[2]} · ${lab}` : `feature L${m[1]}/${m[2]}`, kind: 'feature' };
  }
  return { text: c, kind: 'other' };
}
