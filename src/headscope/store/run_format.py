"""The run directory's files, described once (docs/run-format.md is the prose version).

``SCHEMA_VERSION`` is the one version number of the format: the precompute and the HeadVis
import write it, :func:`headscope.store.open_run` refuses a newer one. The readers validate with
these models; the tests validate every file a real precompute writes against them. Fields may be
added without a version bump (models keep unknown fields), so a newer writer's extras never
break an older reader; a change to an existing field's meaning bumps the version.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelInfo(_Part):
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_model: int | None = None
    architecture: str | None = None
    source: str | None = None


class TokenCount(_Part):
    sequences: int
    tokens: int


class Manifest(_Part):
    """``manifest.json``: how the run was made, and whether it is complete."""

    schema_version: int = Field(le=SCHEMA_VERSION)
    status: Literal["running", "complete"]
    config: dict[str, Any]
    model: ModelInfo | None = None  # absent only while a run is starting
    dataset: dict[str, Any] = Field(default_factory=dict)
    tokens: TokenCount | None = None
    layers: list[int] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, str] = Field(default_factory=dict, description="metric -> UI text")
    attributions: list[str] = Field(default_factory=list)
    across: str | None = Field(
        None, description="motifs/across.json when the run was mapped with other models' runs"
    )
    name: str | None = Field(None, description="the run's name, where its folder name is not")


class MetricsTable(_Part):
    """``metrics.json``: the per-head metrics table for the browser."""

    columns: list[str]
    rows: list[list[float | int | None]]
    docs: dict[str, str] = Field(default_factory=dict)


class Histogram(_Part):
    edges: list[float]
    counts: list[int]


class Bucket(_Part):
    lo: float
    hi: float
    examples: list[int] = Field(description="indices into the head's examples")


class Example(_Part):
    sequence: int
    max_attention: float
    tokens: list[int]
    doc_starts: list[int] = Field(default_factory=list)
    max_as_query: list[float]
    max_as_key: list[float]
    sparse: list[tuple[int, int, float]] = Field(description="[query, key, weight] entries")


class TopToken(_Part):
    token: str
    id: int | None = None
    mass: float
    count: int | None = None


class Projection(_Part):
    coords: list[list[float]]
    variance_ratio: list[float]


class ContextSpan(_Part):
    start: int = Field(description="position of the first token")
    tokens: list[int] = Field(description="token ids (vocab.json has their text)")


class PCAPoint(_Part):
    sequence: int
    q_pos: int
    k_pos: int
    distance: int
    norm: float
    query: str
    key: str
    context: list[ContextSpan] = Field(
        default_factory=list,
        description="tokens around the key, then around the query (one span where they meet)",
    )


class PCA(_Part):
    q: Projection
    k: Projection
    o: Projection
    points: list[PCAPoint]


class SimilarHead(_Part):
    head: str
    distance: float


class HeadPayload(_Part):
    """``heads/L{l}H{h}.json``: everything the head page shows for one head."""

    head: str
    layer: int
    index: int
    metrics: dict[str, float | None]
    curves: dict[str, list[float | None]] = Field(default_factory=dict)
    # a precompute always writes these; an imported tree may lack them
    histogram: Histogram | None = None
    buckets: list[Bucket] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)
    top_query_tokens: list[TopToken] = Field(default_factory=list)
    top_key_tokens: list[TopToken] = Field(default_factory=list)
    pca: PCA | None = Field(None, description="absent or {} where a run has none (imports)")
    similar: list[SimilarHead] = Field(default_factory=list)

    @field_validator("pca", mode="before")
    @classmethod
    def _no_pca(cls, value: Any) -> Any:
        return None if value == {} else value


class MotifMap(_Part):
    """``motifs/map.json``: 2-D maps of the heads and each head's nearest heads."""

    heads: list[str]
    nearest: dict[str, list[str]]
