"""The HeadVis data tree as pydantic models (docs/headvis-format.md): the one description of the
layout, used to read a tree and to write one.

Field names are the ones Neuronpedia's HeadVis writer uses. ``validation_alias`` lists the other
spellings older trees use, so one model reads both; the fields a model lists in ``OLDER`` are
read but never written. Each model checks what needs several of its fields (sparse positions
inside the sequence, histogram lengths); :func:`validate_file` turns a failure into one
``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationError,
    model_validator,
)

__all__ = [
    "HEAD_FILE_PATTERN",
    "QK_DISTANCE_EDGES",
    "ActivationHistogram",
    "HeadFile",
    "HeadId",
    "HeadscopeInfo",
    "Histogram",
    "Int",
    "Num",
    "Scatter",
    "ScatterRecord",
    "Sequence",
    "TopToken",
    "TreeConfig",
    "load_file",
    "validate_file",
]

M = TypeVar("M", bound=BaseModel)

HEAD_FILE_PATTERN = "L{layer}H{head}.json"
# bins of the query-key distance histogram: [0, 1), [1, 2), [2, 4), ... [2048, 4096)
QK_DISTANCE_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# the frontend's extra panels: each names a field of the head files
CUSTOM_PLOTS = [
    {"key": "qk_distance_histogram", "label": "Query-key distance (attention-weighted)"},
    {"key": "histogram", "label": "Max attention per sequence"},
]
CUSTOM_TABLES = [
    {"key": "top_query_tokens", "label": "Top query tokens"},
    {"key": "top_key_tokens", "label": "Top key tokens"},
]
STATISTICS_DISPLAY = {
    "n_samples": {"label": "Sequences sampled", "format": "default"},
    "mean_max_activation": {"label": "Mean max attention", "format": "default"},
}


def _not_bool(value: Any) -> Any:
    # JSON true/false is never a count or a weight; pydantic would read it as 1/0
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Num = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]

_HEAD_ID = (re.compile(r"L(\d+)H(\d+)"), re.compile(r"(\d+)[_.](\d+)"))


def _head_id(value: Any) -> Any:
    """``"L5H3"``, ``"5_3"``, ``"5.3"``, ``[5, 3]`` or ``{"layer": 5, "head": 3}`` -> (5, 3)."""
    if isinstance(value, str):
        for pattern in _HEAD_ID:
            m = pattern.fullmatch(value.strip())
            if m:
                return int(m.group(1)), int(m.group(2))
    elif isinstance(value, list | tuple) and len(value) == 2:
        return value
    elif isinstance(value, dict) and "layer" in value and "head" in value:
        return value["layer"], value["head"]
    raise ValueError(f"cannot read a head id from {value!r}; expected e.g. [5, 3] or 'L5H3'")


HeadId = Annotated[tuple[Int, Int], BeforeValidator(_head_id)]


def _triple(value: Any) -> Any:
    if isinstance(value, dict):
        keys = (("query", "q"), ("key", "k"), ("weight", "w", "value"))
        value = [next((value[k] for k in ks if k in value), None) for ks in keys]
    if not isinstance(value, list) or len(value) != 3 or None in value:
        raise ValueError(f"expected a [query, key, weight] triple, got {value!r}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())
    OLDER: ClassVar[frozenset[str]] = frozenset()  # fields read from older trees, never written

    def dump(self) -> dict:
        """The JSON object this model writes (no fields of older trees, no unset optionals)."""
        return self.model_dump(exclude=set(self.OLDER), exclude_none=True)


# ------------------------------------------------------------------------------- head files


class Sequence(_Model):
    """One sampled sequence and its sparse attention pattern.

    The pattern is flat COO: entry ``i`` is query ``attention_indices[i] // seq_len``, key
    ``attention_indices[i] % seq_len``, weight ``attention_values[i]``, with ``seq_len`` the
    number of tokens. Older trees give ``[query, key, weight]`` triples instead.
    """

    OLDER: ClassVar[frozenset[str]] = frozenset({"sparse_attention"})

    sequence_id: Int | None = Field(
        None, validation_alias=AliasChoices("sequence_id", "sequence_index", "index", "seq_idx")
    )
    interval: Int | None = None  # 1 = lowest max attention, n_intervals = highest
    tokens: list[str] = Field(validation_alias=AliasChoices("tokens", "token_strings"))
    seq_len: Int | None = None
    attention_indices: list[Int] | None = None
    attention_values: list[Num] | None = None
    max_activation: Num | None = Field(
        None,
        validation_alias=AliasChoices("max_activation", "max_attention", "max_act", "max_value"),
    )
    doc_starts: list[Int] | None = None  # headscope: first tokens of packed documents
    sparse_attention: list[Annotated[tuple[Int, Int, Num], BeforeValidator(_triple)]] | None = (
        Field(
            None,
            validation_alias=AliasChoices(
                "sparse_attention", "sparse", "attention", "sparse_pattern", "pattern"
            ),
        )
    )
    _qkw: tuple[np.ndarray, np.ndarray, np.ndarray] = PrivateAttr()

    @model_validator(mode="after")
    def _check(self) -> Sequence:
        n = len(self.tokens)
        if self.seq_len is not None and self.seq_len != n:
            raise ValueError(f"seq_len {self.seq_len} is not the number of tokens ({n})")
        if self.attention_indices is not None or self.attention_values is not None:
            flat = np.asarray(self.attention_indices or [], dtype=np.int64)  # [N]
            w = np.asarray(self.attention_values or [], dtype=np.float64)  # [N]
            if len(flat) != len(w):
                raise ValueError(f"{len(flat)} attention_indices but {len(w)} attention_values")
            bad = np.flatnonzero((flat < 0) | (flat >= n * n))
            if len(bad):
                i = int(bad[0])
                raise ValueError(
                    f"attention_indices[{i}] = {flat[i]} is outside the {n} x {n} pattern"
                )
            q, k, where = flat // max(n, 1), flat % max(n, 1), "attention_indices"
        else:
            qkw = np.asarray(self.sparse_attention or [], dtype=np.float64).reshape(-1, 3)
            q, k, w, where = qkw[:, 0].astype(np.int64), qkw[:, 1].astype(np.int64), qkw[:, 2], ""
            for name, pos in (("query", q), ("key", k)):
                bad = np.flatnonzero((pos < 0) | (pos >= n))
                if len(bad):
                    i = int(bad[0])
                    raise ValueError(
                        f"sparse entry [{i}]: {name} position {pos[i]} is outside the "
                        f"sequence's {n} tokens"
                    )
        entry = f"{where}[{{}}]" if where else "sparse entry [{}]"
        bad = np.flatnonzero(k > q)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{entry.format(i)}: key position {k[i]} comes after query position {q[i]} "
                "(causal attention)"
            )
        bad = np.flatnonzero((w < 0.0) | (w > 1.0))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{entry.format(i)}: attention weight {w[i]} is outside [0, 1]")
        if self.max_activation is not None and not 0.0 <= self.max_activation <= 1.0:
            raise ValueError(f"max_activation {self.max_activation} is outside [0, 1]")
        for i, s in enumerate(self.doc_starts or []):
            if not 0 <= s < max(1, n):
                raise ValueError(f"doc_starts[{i}]: position {s} is outside the sequence")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval {self.interval} is below 1 (intervals count from 1)")
        self._qkw = (q, k, w)
        return self

    def triples(self) -> list[list]:
        """The sparse pattern as ``[[query, key, weight], ...]``, in the tree's order."""
        q, k, w = self._qkw
        return [[int(a), int(b), float(c)] for a, b, c in zip(q, k, w, strict=True)]

    def max_attention(self) -> float:
        """``max_activation``, or from the pattern: the largest weight with query, key >= 1."""
        if self.max_activation is not None:
            return self.max_activation
        q, k, w = self._qkw
        kept = (q >= 1) & (k >= 1)
        return float(w[kept].max()) if kept.any() else 0.0


class Histogram(_Model):
    """``bin_values[i]`` belongs to ``[bin_edges[i], bin_edges[i + 1])``."""

    bin_edges: list[Num] = Field(validation_alias=AliasChoices("bin_edges", "edges", "bins"))
    bin_values: list[Num] = Field(validation_alias=AliasChoices("bin_values", "counts", "values"))

    @model_validator(mode="after")
    def _check(self) -> Histogram:
        e, v = self.bin_edges, self.bin_values
        if len(v) != len(e) - 1:
            raise ValueError(f"{len(e)} bin edges need {len(e) - 1} bin values, not {len(v)}")
        if any(b < a for a, b in zip(e, e[1:], strict=False)):
            raise ValueError("bin edges must be increasing")
        if any(x < 0 for x in v):
            raise ValueError("bin values must not be negative")
        return self


class ActivationHistogram(Histogram):
    """How many sequences have their max attention in each bin (all processed sequences)."""

    # counts: integers, a narrower list than the base class's floats
    bin_values: list[Int] = Field(  # type: ignore[assignment]
        validation_alias=AliasChoices("bin_values", "counts", "values")
    )


class TopToken(_Model):
    """A token and the attention it pays (as query) or receives (as key).

    Neuronpedia writes ``weight`` as a total over the sampled sequences; headscope writes its
    per-occurrence mean and adds ``count``, the occurrences it averages over.
    """

    token: str
    weight: Num = Field(
        0.0,
        validation_alias=AliasChoices("weight", "mass", "mean_attention", "mean_mass", "attention"),
    )
    count: Int | None = None


class Decile(_Model):
    """Older trees: one max-attention interval and its sequences."""

    interval: tuple[Num, Num] = Field(validation_alias=AliasChoices("interval", "range", "bounds"))
    sequences: list[Sequence] = Field(
        default_factory=list, validation_alias=AliasChoices("sequences", "examples")
    )

    @model_validator(mode="before")
    @classmethod
    def _lo_hi(cls, data: Any) -> Any:
        if not isinstance(data, dict) or any(k in data for k in ("interval", "range", "bounds")):
            return data
        pairs = (("lo", "hi"), ("min", "max"), ("low", "high"))
        for lo, hi in pairs:
            if lo in data and hi in data:
                return {**data, "interval": [data[lo], data[hi]]}
        raise ValueError("a decile needs 'interval': [lo, hi]")

    @model_validator(mode="after")
    def _check(self) -> Decile:
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"decile interval [{lo}, {hi}] is not inside [0, 1] with lo <= hi")
        return self


class HeadFile(_Model):
    """``heads/L{l}H{h}.json``: one head's sampled sequences and aggregates."""

    OLDER: ClassVar[frozenset[str]] = frozenset({"deciles", "layer", "head"})

    sequences: list[Sequence] = Field(default_factory=list)
    qk_distance_histogram: Histogram | None = None
    top_query_tokens: list[TopToken] = Field(default_factory=list)
    top_key_tokens: list[TopToken] = Field(default_factory=list)
    histogram: ActivationHistogram | None = None
    # n_samples, mean_max_activation; older trees: metric values
    statistics: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("statistics", "stats", "metrics")
    )
    # headscope: [lo, hi] of each interval, lowest first (Neuronpedia does not store them)
    interval_bounds: list[tuple[Num, Num]] | None = None
    deciles: list[Decile] | None = None
    layer: Int | None = None
    head: Int | None = None

    @model_validator(mode="after")
    def _check(self) -> HeadFile:
        for i, seq in enumerate(self.sequences):
            if seq.interval is None:
                raise ValueError(f"sequences[{i}] has no 'interval'")
            if self.interval_bounds is not None and seq.interval > len(self.interval_bounds):
                raise ValueError(
                    f"sequences[{i}]: interval {seq.interval} has no interval_bounds entry"
                )
        for i, (lo, hi) in enumerate(self.interval_bounds or []):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"interval_bounds[{i}] = [{lo}, {hi}] is not inside [0, 1]")
        return self


# ---------------------------------------------------------------------- scatter and config


class ScatterRecord(_Model):
    """One head's row of the head-selector scatter: its id and one value per metric."""

    model_config = ConfigDict(extra="allow")
    ID_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"layer", "head", "id", "name", "head_id", "label"}
    )

    layer: Int | None = None
    head: Int | None = None
    id: HeadId | None = Field(None, validation_alias=AliasChoices("id", "name", "head_id"))

    @model_validator(mode="after")
    def _check(self) -> ScatterRecord:
        if (self.layer is None or self.head is None) and self.id is None:
            raise ValueError("a scatter record needs 'layer' and 'head'")
        return self

    @property
    def layer_head(self) -> tuple[int, int]:
        if self.layer is not None and self.head is not None:
            return self.layer, self.head
        assert self.id is not None
        return self.id

    @property
    def values(self) -> dict[str, Any]:
        """Everything but the id keys: the metric values as written (numbers or null)."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in self.ID_KEYS}


def _unwrap_scatter(value: Any) -> Any:
    if isinstance(value, dict):
        for key in ("heads", "data", "records", "points"):
            if key in value:
                return value[key]
    return value


class Scatter(RootModel[list[ScatterRecord]]):
    """``scatter_data.json``: a list of records (older trees may wrap it in an object)."""

    root: Annotated[list[ScatterRecord], BeforeValidator(_unwrap_scatter)]


class HeadscopeInfo(_Model):
    """What headscope adds to config.json so that its import gets the whole run back."""

    format_version: Int = 1
    model: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    tokens: dict[str, Any] | None = None
    precompute: dict[str, Any] | None = None


def _named(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _metric_list(value: Any) -> Any:
    """Names, ``{name, description|doc}`` objects, or a ``{name: description}`` object."""
    if isinstance(value, dict):
        return [{"name": k, "description": v} for k, v in value.items()]
    if isinstance(value, list):
        out = []
        for m in value:
            if isinstance(m, str):
                out.append({"name": m})
            elif isinstance(m, dict) and "doc" in m and "description" not in m:
                out.append({**m, "description": m["doc"]})
            else:
                out.append(m)
        return out
    return value


class MetricEntry(_Model):
    name: str
    description: str | None = None


class TreeConfig(_Model):
    """``config.json``: what the frontend needs to lay out the heads, and how the data was made.

    The Neuronpedia loaders read ``model_name``, ``dataset_name``, ``np_model_id`` and, from
    ``pipeline_config`` (merged under the top level), ``n_sequences``, ``seq_len``, ``dtype`` and
    ``attn_implementation``.
    """

    OLDER: ClassVar[frozenset[str]] = frozenset(
        {"model", "dataset", "format", "format_version", "tokens", "precompute"}
    )

    model_name: str | None = None
    np_model_id: str | None = None
    dataset_name: str | None = None
    heads: list[HeadId] | None = None
    n_layers: Int | None = None
    n_heads: Int | None = None
    n_intervals: Int | None = None
    metrics: Annotated[list[MetricEntry], BeforeValidator(_metric_list)] | None = None
    metric_descriptions: dict[str, str] = Field(default_factory=dict)
    head_data_pattern: str = HEAD_FILE_PATTERN
    has_umap: bool = False
    umap_heads: list[Any] = Field(default_factory=list)
    custom_plots: list[dict[str, str]] = Field(default_factory=lambda: list(CUSTOM_PLOTS))
    custom_tables: list[dict[str, str]] = Field(default_factory=lambda: list(CUSTOM_TABLES))
    statistics_display: dict[str, dict[str, str]] = Field(
        default_factory=lambda: dict(STATISTICS_DISPLAY)
    )
    pipeline_config: dict[str, Any] | None = None
    headscope: HeadscopeInfo | None = None
    model: Annotated[dict[str, Any], BeforeValidator(_named)] | None = None
    dataset: Annotated[dict[str, Any], BeforeValidator(_named)] | None = None
    format: str | None = None
    format_version: Int | None = None
    tokens: dict[str, Any] | None = None
    precompute: dict[str, Any] | None = None

    def dump(self) -> dict:
        out = super().dump()
        out["metrics"] = [m.name for m in self.metrics or []]
        out["heads"] = [list(h) for h in self.heads or []]
        return out


# ----------------------------------------------------------------------------- reading


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("root",) and not str(part).startswith(("function-", "tuple[")):
            out += f".{part}" if out else str(part)
    return out


def _problem(e: ValidationError, path: Path) -> ValueError:
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return ValueError(f"{path}: not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "required field missing"
    at = _location(first["loc"])
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ValueError(f"{path}{' at ' + at if at else ''}: {msg}{more}")


def validate_file(model: type[M], raw: Any, path: Path) -> M:
    """``model`` validated from ``raw`` (the content of ``path``), or one ``ValueError`` naming
    the file, the place in it and the first problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise _problem(e, path) from None


def load_file(model: type[M], path: Path) -> M:
    """Read the JSON file ``path`` as ``model`` (see :func:`validate_file`)."""
    try:
        return model.model_validate_json(Path(path).read_bytes())
    except ValidationError as e:
        raise _problem(e, path) from None
