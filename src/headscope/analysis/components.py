"""Residual-stream components: their labels, and the bases that decompose a residual into them.

The residual entering a layer at a position is exactly a sum of rows of a *basis*:

* :class:`ComponentBasis` (the default): ``embed``, ``pos_embed`` (learned positions only),
  ``L{l}H{h}`` and ``L{l}.mlp`` for every earlier layer, and ``bias``;
* a dictionary (:class:`headscope.dictionaries.basis.DictionarySet`): ``sae:L{l}/{i}`` feature
  rows, ``sae:L{l}/b_dec`` and ``sae:L{l}/error``.

Attribution, composition, interventions and head loadings take any :class:`Basis`. A label is
parsed in one place, :meth:`Component.parse`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from headscope.errors import InputError
from headscope.model.spec import head_name

if TYPE_CHECKING:
    from headscope.analysis.session import Session, TextState

Kind = Literal["embed", "pos_embed", "bias", "head", "mlp", "feature", "b_dec", "error"]
_LABEL = re.compile(r"L(\d+)H(\d+)|L(\d+)\.mlp|sae:L(\d+)/(\d+|b_dec|error)")

# labels, X [C, d_model] rows summing to the residual, bias flag [C] (1 where the projection's
# constant part belongs)
Decomposition = tuple[list[str], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Component:
    """One row of a residual decomposition, parsed from its label."""

    kind: Kind
    layer: int | None = None  # the writing layer (head, mlp) or the dictionary's layer
    index: int | None = None  # the head (kind "head") or the feature (kind "feature")

    @classmethod
    def parse(cls, label: str) -> Component:
        if label in ("embed", "pos_embed", "bias"):
            return cls(label)  # type: ignore[arg-type]
        m = _LABEL.fullmatch(label)
        if not m:
            raise InputError(
                f"unknown component {label!r}: use embed, pos_embed, bias, L3H1, L3.mlp or "
                "sae:L3/123 (a dictionary feature)"
            )
        if m.group(1) is not None:
            return cls("head", int(m.group(1)), int(m.group(2)))
        if m.group(3) is not None:
            return cls("mlp", int(m.group(3)))
        layer, what = int(m.group(4)), m.group(5)
        if what in ("b_dec", "error"):
            return cls(what, layer)  # type: ignore[arg-type]
        return cls("feature", layer, int(what))

    def __str__(self) -> str:
        if self.kind == "head":
            return head_name(self.layer or 0, self.index or 0)
        if self.kind == "mlp":
            return f"L{self.layer}.mlp"
        if self.kind == "feature":
            return f"sae:L{self.layer}/{self.index}"
        if self.kind in ("b_dec", "error"):
            return f"sae:L{self.layer}/{self.kind}"
        return self.kind


class Basis(Protocol):
    """A decomposition of the residual stream into labelled rows that sum to it exactly."""

    name: str

    def decompose(self, session: Session, st: TextState, layer: int, pos: int) -> Decomposition:
        """The residual entering ``layer`` at ``pos`` as rows (see :data:`Decomposition`)."""
        ...

    def decompose_at(
        self, session: Session, st: TextState, layer: int, positions: list[int]
    ) -> list[Decomposition]:
        """:meth:`decompose` at each of ``positions`` (a QK edge's query and key), the same rows
        as one at a time; a basis shares what the positions have in common here."""
        ...

    def vector(self, session: Session, st: TextState, label: str, layer: int) -> torch.Tensor:
        """Row ``label`` of the residual entering ``layer``, at every position: ``[T, d]``."""
        ...

    def cards(self, labels: set[str]) -> dict[str, dict]:
        """Hover cards of the labels that have one (features)."""
        ...


def _layer_parts(
    session: Session, st: TextState, lay: int, pos: int | slice | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What layer ``lay`` wrote at ``pos``: heads ``[..., H, d]``, MLP ``[..., d]`` and the
    attention output bias ``[..., d]`` (through Gemma's frozen post-attention norm)."""
    ad, cap = session.adapter, st.cap
    heads = ad.head_outputs(cap.layers[lay].z[0, pos], lay)  # [..., H, d]
    b_o = ad.weights(lay).b_O.expand_as(heads[..., 0, :])
    factor = ad.post_attn_factor(cap.attn_out[lay][0, pos], lay)  # [..., d] or None
    if factor is not None:
        heads, b_o = heads * factor[..., None, :], b_o * factor
    return heads, cap.mlp_contrib[lay][0, pos], b_o


@functools.cache
def _component_labels(n_heads: int, layer: int, pos_embed: bool) -> tuple[str, ...]:
    """The labels of :meth:`ComponentBasis.decompose`'s rows for ``layer``, in order."""
    labels = ["embed", *(["pos_embed"] if pos_embed else [])]
    for lay in range(layer):
        labels += [head_name(lay, h) for h in range(n_heads)]
        labels.append(f"L{lay}.mlp")
    return (*labels, "bias")


class ComponentBasis:
    """The residual as the outputs of the model's own parts (see the module docstring)."""

    name = "components"

    def decompose(self, session: Session, st: TextState, layer: int, pos: int) -> Decomposition:
        return self.decompose_at(session, st, layer, [pos])[0]

    def decompose_at(
        self, session: Session, st: TextState, layer: int, positions: list[int]
    ) -> list[Decomposition]:
        """:meth:`decompose` at several positions (a QK edge's query and key) in one pass:
        reading each earlier layer's ``W_O`` is most of the work, and is done once for all of
        them. The same rows, bit for bit, as one position at a time."""
        ad, cap = session.adapter, st.cap
        idx = torch.tensor(positions, dtype=torch.long)
        rows: list[torch.Tensor] = [cap.get("embed")[0, idx][:, None]]  # each [P, n, d]
        if cap.pos_embed is not None:
            rows.append(cap.pos_embed[0, idx][:, None])
        bias = rows[0].new_zeros(len(positions), ad.spec.d_model)  # [P, d]
        for lay in range(layer):
            heads, mlp, b_o = _layer_parts(session, st, lay, idx)  # [P, H, d], [P, d], [P, d]
            rows += [heads, mlp[:, None]]
            bias = bias + b_o
        rows.append(bias[:, None])
        X = torch.cat(rows, dim=1)  # [P, C, d]
        labels = _component_labels(ad.spec.n_heads, layer, cap.pos_embed is not None)
        flag = torch.zeros(len(labels), dtype=X.dtype, device=X.device)
        flag[-1] = 1.0
        return [(list(labels), X[i], flag) for i in range(len(positions))]

    def vector(self, session: Session, st: TextState, label: str, layer: int) -> torch.Tensor:
        c = Component.parse(label)
        cap, every = st.cap, slice(None)
        if c.kind == "embed":
            return cap.get("embed")[0]
        if c.kind == "pos_embed":
            if cap.pos_embed is None:
                raise InputError("this model has no learned positional embedding")
            return cap.pos_embed[0]
        if c.kind == "bias":
            total = torch.zeros_like(cap.get("embed")[0])
            for lay in range(layer):
                total = total + _layer_parts(session, st, lay, every)[2]
            return total
        if c.kind not in ("head", "mlp"):
            raise InputError(f"{label} is a dictionary row: choose the dictionary basis for it")
        assert c.layer is not None
        if c.layer >= layer:
            raise InputError(f"component {label} is not upstream of layer {layer}")
        if c.kind == "mlp":
            return cap.mlp_contrib[c.layer][0]
        if not 0 <= (c.index or 0) < session.adapter.spec.n_heads:
            raise InputError(f"unknown head in component {label!r}")
        return _layer_parts(session, st, c.layer, every)[0][:, c.index]

    def cards(self, labels: set[str]) -> dict[str, dict]:
        return {}


COMPONENTS = ComponentBasis()
