// The head page's z-dictionary panel (heads/L{l}H{h}.json's `zsae`, written by
// `headscope z-heads SAES RUN --add-column`): the head's class after "We Inspected Every Head in
// GPT-2 Small Using SAEs", how much of its output its features explain, the model-wide tally,
// and its top 10 features by decoder-norm share with their top context and promoted tokens.

import { h, fmt } from '../lib/dom.js';
import { labelToken } from '../lib/tokens.js';

// one colour per group of related features (a group beyond these reuses the last)
const GROUP_COLORS = ['#3182bd', '#e6550d', '#31a354', '#756bb1', '#636363', '#bdbdbd'];
const pct = (v) => (v === null || v === undefined ? '–' : `${fmt(100 * v, 3)}%`);

/** "…thou comest⟦,⟧ and what…" on one line (newlines as ↵), the activating token highlighted. */
function context(text) {
  if (!text) return h('span', { class: 'muted' }, 'no card');
  const flat = (t) => t.replace(/\r?\n/g, '↵').replace(/\t/g, '⇥');
  const a = text.indexOf('⟦');
  const b = text.lastIndexOf('⟧');
  if (a < 0 || b < a) return h('span', { class: 'zsae-ctx', title: text }, flat(text));
  // the marked token stays in view: at most ~24 characters before it and ~16 after
  const pre = flat(text.slice(0, a));
  const post = flat(text.slice(b + 1));
  return h('span', { class: 'zsae-ctx', title: text }, pre.length > 24 ? `…${pre.slice(-23)}` : pre,
    h('mark', { title: 'the token it fires on' }, flat(text.slice(a + 1, b))), post.length > 16 ? `${post.slice(0, 15)}…` : post);
}

function tally(z) {
  const parts = Object.entries(z.tally || {}).map(([c, n]) => `${n} ${c}`);
  const total = Object.values(z.tally || {}).reduce((s, n) => s + n, 0);
  const layers = z.layers && z.layers.length ? ` (layer${z.layers.length > 1 ? 's' : ''} ${z.layers.join(', ')})` : '';
  return `all ${total} heads with a z dictionary${layers}: ${parts.join(' · ')}`;
}

/** The panel for a head's `zsae` entry (null when the run has none for this head). */
export function zsaePanel(z) {
  if (!z) return null;
  const groups = (z.group_sizes || []).join(' + ');
  const measured = z.n_tokens
    ? `on ${z.n_tokens.toLocaleString('en-US')} tokens of ${String(z.data || '').split('/').pop()}`
    : 'not measured';
  const rows = (z.top_features || []).map((t) => h('tr', {},
    h('td', {}, h('span', {
      class: 'zsae-group', title: `group ${t.group + 1} of related features`,
      style: { background: GROUP_COLORS[Math.min(t.group, GROUP_COLORS.length - 1)] },
    }), `#${t.feature}`),
    h('td', { class: 'num', title: 'decoder-norm share: this head’s slice of the feature’s decoder row over all heads’' }, fmt(t.share, 2)),
    h('td', { class: 'num', title: 'direct feature attribution: this head’s part of the feature’s pre-activation where it fires' }, t.dfa_share === null || t.dfa_share === undefined ? '–' : fmt(t.dfa_share, 2)),
    h('td', { class: 'zsae-what' }, context(t.context),
      t.promoted && t.promoted.length ? h('div', { class: 'muted small' }, '→ ', t.promoted.slice(0, 3).map((p) => h('span', { class: 'chip' }, labelToken(p)))) : null)));
  return h('section', { class: 'panel zsae-panel' },
    h('div', { class: 'panel-head' }, h('h3', {}, 'z-dictionary features'),
      h('span', { class: `badge zsae-class zsae-c${z.class_index || 0}`, title: 'its top 10 features: all related (monosemantic), all but one or two (mostly), two groups (bisemantic), more (polysemantic)' }, z.semantic_class || 'no features')),
    h('p', { class: 'small' }, `top 10 features by decoder-norm share, in groups of ${groups || '–'}. `,
      `Its features explain ${pct(z.explained)} of its output variance (its top 10 alone: ${pct(z.top_explained)}), ${measured}.`),
    h('p', { class: 'muted small zsae-tally' }, tally(z)),
    h('table', { class: 'data compact zsae-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'feature'), h('th', { class: 'num' }, 'share'), h('th', { class: 'num' }, 'DFA'), h('th', {}, 'top context → promoted'))),
      h('tbody', {}, rows)),
    h('p', { class: 'muted small' }, 'Related features (same colour) share an activating or promoted token, or the head writes nearly the same direction for them. z features have no page of their own: feature pages cover residual dictionaries.'));
}
