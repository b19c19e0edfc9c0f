"""Residual-stream dictionaries as an attribution basis.

With an SAE on the residual entering a head's layer, the residual at a position is exactly
``sum_i a_i d_i + b_dec + error`` (error = residual - reconstruction). Each row goes through the
same frozen-norm linear maps as the component basis, so QK and OV attributions in features add
up to the model's own numbers; the error row is labelled as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from headscope.analysis.components import Component, Decomposition
from headscope.dictionaries.labels import feature_label
from headscope.dictionaries.sae import CFG_FILENAME, SAE, load_sae, parse_hook_name
from headscope.errors import InputError


@dataclass
class Dictionary:
    """One SAE on the residual stream entering ``layer``."""

    sae: SAE  # norm scaling folded in, float32
    layer: int
    path: Path
    features: dict[str, dict]  # feature index (as str) -> hover card, from features.json
    site: str = "resid"  # "z": an SAE on ``layer``'s per-head attention outputs before W_O

    @property
    def n_features(self) -> int:
        return self.sae.cfg.d_sae

    def label(self, i: int) -> str:
        return f"sae:L{self.layer}/{i}" if self.site == "resid" else f"zsae:L{self.layer}/{i}"


def _load_one(folder: Path) -> Dictionary:
    sae = load_sae(folder, dtype="float32").with_norm_scaling_folded()
    site, layers = parse_hook_name(sae.cfg.hook_name)
    if site == "z" and len(layers) == 1:
        cards_path = folder / "features.json"
        cards = json.loads(cards_path.read_text()) if cards_path.is_file() else {}
        return Dictionary(sae.eval(), layers[0], folder, cards, site="z")
    if site != "resid" or len(layers) != 1 or "resid_mid" in sae.cfg.hook_name:
        raise InputError(
            f"{folder}: attributions need a residual-stream SAE (hook {sae.cfg.hook_name!r})"
        )
    layer = layers[0]
    if sae.cfg.hook_name.endswith("hook_resid_post"):
        layer += 1  # the residual after layer L is the one entering layer L + 1
    cards_path = folder / "features.json"
    cards = json.loads(cards_path.read_text()) if cards_path.is_file() else {}
    return Dictionary(sae.eval(), layer, folder, cards)


class DictionarySet:
    """Residual dictionaries by layer, from a ``train-sae`` output folder or one SAELens folder."""

    def __init__(self, path: Path | str):
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"no dictionary folder {path}")
        folders = (
            [path]
            if (path / CFG_FILENAME).is_file()
            else sorted(p for p in path.iterdir() if (p / CFG_FILENAME).is_file())
        )
        self.by_layer: dict[int, Dictionary] = {}
        # one-layer z dictionaries: not a basis of the residual, but they read a head's output
        self.z_by_layer: dict[int, Dictionary] = {}
        for folder in folders:
            try:
                d = _load_one(folder)
            except InputError:
                continue  # v or multi-layer dictionaries live beside residual ones
            (self.z_by_layer if d.site == "z" else self.by_layer)[d.layer] = d
        if not self.by_layer:
            raise InputError(
                f"{path} holds no residual-stream SAE (cfg.json + sae_weights.safetensors)"
            )
        self.name = f"sae:{path}"

    def to(self, device: torch.device | str) -> DictionarySet:
        """Move every dictionary to ``device`` (the model's: they read its activations)."""
        for d in (*self.by_layer.values(), *self.z_by_layer.values()):
            d.sae.to(device)
        return self

    def for_layer(self, layer: int) -> Dictionary:
        if layer not in self.by_layer:
            raise InputError(
                f"no residual dictionary for layer {layer}; have layers {sorted(self.by_layer)}"
            )
        return self.by_layer[layer]

    def decompose(self, session, st, layer: int, pos: int) -> Decomposition:
        """Rows: each active feature a_i d_i, then b_dec, the error, and the projection's
        constant part (``bias``, a zero residual vector flagged as bias)."""
        d = self.for_layer(layer)
        x = session.resid(st, layer, pos).float()  # [d_model]
        with torch.no_grad():
            acts = d.sae.encode(x[None])[0]  # [F]
            idx = acts.nonzero().flatten()
            rows = acts[idx, None] * d.sae.W_dec[idx]  # [n, d_model]
            b_dec = d.sae.b_dec.detach()
        err = x - rows.sum(0) - b_dec
        zero = torch.zeros_like(x)
        X = torch.cat([rows, b_dec[None], err[None], zero[None]]).to(x.dtype)
        labels = [d.label(i) for i in idx.tolist()] + [
            f"sae:L{layer}/b_dec",
            f"sae:L{layer}/error",
            "bias",
        ]
        flag = torch.zeros(len(labels), dtype=X.dtype, device=X.device)
        flag[-1] = 1.0
        return labels, X, flag

    def decompose_at(self, session, st, layer: int, positions: list[int]) -> list[Decomposition]:
        """:meth:`decompose` at each position (each has its own active features)."""
        return [self.decompose(session, st, layer, pos) for pos in positions]

    def vector(self, session, st, label: str, layer: int) -> torch.Tensor:
        """Row ``label`` (a feature, ``b_dec`` or ``error``) of the residual entering ``layer``
        at every position ``[T, d]``: a feature's activation there times its decoder vector."""
        c = Component.parse(label)
        if c.layer != layer or c.kind not in ("feature", "b_dec", "error"):
            raise InputError(f"{label} is not a row of layer {layer}'s dictionary")
        d = self.for_layer(layer)
        x = st.cap.resid_pre[layer][0].float()  # [T, d]
        with torch.no_grad():
            acts = d.sae.encode(x)  # [T, F]
            b_dec = d.sae.b_dec.detach().expand_as(x)
            if c.kind == "feature":
                if not 0 <= (c.index or 0) < d.n_features:
                    raise InputError(f"feature {c.index} out of range 0..{d.n_features - 1}")
                return acts[:, c.index, None] * d.sae.W_dec[c.index].detach()
            if c.kind == "b_dec":
                return b_dec
            return x - acts @ d.sae.W_dec.detach() - b_dec

    def output_dictionary(self, layer: int) -> Dictionary | None:
        """The dictionary that reads what a head of ``layer`` writes: the next layer's residual
        dictionary (its encoder reads the residual the head's output is added to), else the
        layer's z dictionary; None when there is neither."""
        return self.by_layer.get(layer + 1) or self.z_by_layer.get(layer)

    def output_read(
        self, session, st, layer: int, head: int, query: int
    ) -> tuple[Dictionary, torch.Tensor, torch.Tensor] | None:
        """How the output dictionary of ``layer`` (:meth:`output_dictionary`) reads head
        ``head``'s output: ``(dictionary, E, acts)`` with ``E`` the encoder directions ``[d_model,
        F]`` (a residual dictionary) or the head's slice of them ``[D, F]`` (a z dictionary: the
        head's output before W_O), and ``acts [F]`` the dictionary's activations at ``query``.
        A feature's pre-activation changes by ``x @ E[:, f]`` when ``x`` is added to what it reads.
        """
        d = self.output_dictionary(layer)
        if d is None:
            return None
        W_enc = d.sae.W_enc.detach().to(torch.float64)  # [d_in, F]
        with torch.no_grad():
            if d.site == "resid":
                x = session.resid(st, d.layer, query).float()  # [d_model]
                return d, W_enc, d.sae.encode(x[None])[0]
            D = session.adapter.spec.d_head
            z = st.cap.layers[layer].z[0, query].reshape(-1).float()  # [H * D]
            return d, W_enc[head * D : (head + 1) * D], d.sae.encode(z[None])[0]

    def cards(self, labels: set[str]) -> dict[str, dict]:
        """Hover cards (top contexts, density, promoted tokens, a short ``label``) of the feature
        labels given."""
        out = {}
        for label in labels:
            for prefix, table in (("sae:L", self.by_layer), ("zsae:L", self.z_by_layer)):
                if not label.startswith(prefix) or "/" not in label:
                    continue
                layer_s, idx = label[len(prefix) :].split("/", 1)
                d = table.get(int(layer_s)) if layer_s.isdigit() else None
                if d is not None and idx in d.features:
                    card = d.features[idx]
                    out[label] = {**card, "label": feature_label(card)}
        return out
