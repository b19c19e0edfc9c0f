"""Residual dictionaries for every layer of a model from one activation stream.

:func:`train_layers` runs the model once over the data, capturing the residual stream entering
every layer in the same forward pass, and keeps the rows on disk (``OUT/_stream/``: one file of
held-out rows, then shards of about ``shard_tokens`` training rows in bfloat16, each written
atomically, so an interrupted capture resumes at the last whole shard). Each layer's TopK SAE
then trains from its own rows (``epochs`` shuffled passes), is measured on the held-out rows,
labelled from its training rows and saved as ``OUT/resid_L{l}/`` — so the forward pass is paid
once for all layers, the layers finish one by one, and a finished layer is never trained again
(its ``stats.json`` records the settings; a later call with the same settings skips it). When
every layer is done the stream is deleted.

``OUT/quality.json`` holds one row per layer (:class:`LayerQuality`: explained variance, L0,
dead fraction, and the error term's share of QK attributions on held-out text, see
:func:`error_share`); ``OUT/status.json`` says what the run is doing (phase, layers done, an ETA)
for a server that swaps layers in as they finish.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from headscope.dictionaries.activations import site_key
from headscope.dictionaries.labels import (
    FEATURES_FILENAME,
    FEATURES_META_FILENAME,
    LabelConfig,
    _cards,
    _TopK,
    output_directions,
    promoted_tokens,
)
from headscope.dictionaries.pipeline import default_lr
from headscope.dictionaries.quality import LayerQuality, error_share, format_quality
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.dictionaries.stream import (
    EVAL_FILE,
    StreamConfig,
    capture_stream,
    held_out_sequences,
    held_out_texts,
    read_ids,
    read_layer,
    shard_files,
)
from headscope.dictionaries.train import TrainStats, train_saes
from headscope.files import read_json, write_json
from headscope.model import ModelAdapter

STREAM_DIR = "_stream"
STATUS_FILENAME = "status.json"
QUALITY_FILENAME = "quality.json"
STATS_FILENAME = "stats.json"


@dataclass(frozen=True)
class LayerwiseConfig:
    """How ``train_layers`` makes its dictionaries (written into each layer's ``stats.json``).

    n_tokens: training rows captured (BOS positions left out), after ``n_eval`` held-out rows;
    epochs: passes over them per layer. seq_len / batch_size: packed sequences per forward pass.
    sae_batch_size: rows per optimiser step (256: at ~100k row-passes per layer the SAE is
    short of steps; 4x the steps of batches of 1,024 add 0.006-0.043 held-out explained
    variance on each layer of the default model for ~1.5x the SAE's CPU time,
    docs/dictionaries.md).
    lr: Adam's (None: ``default_lr(n_features)``).
    label_tokens: the last training rows the feature cards are read from (0: no cards).
    edges: random (head, query, key) edges per layer for the error share (0: not measured).
    """

    model: str
    data: str
    text_field: str = "text"
    n_features: int = 2048
    k: int = 64
    n_tokens: int = 50_000
    epochs: int = 2
    n_eval: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    sae_batch_size: int = 256
    lr: float | None = None
    label_tokens: int = 20_000
    edges: int = 16
    shard_tokens: int = 8192
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerwiseConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def stream(self) -> StreamConfig:
        """The settings the captured rows depend on."""
        return StreamConfig(
            self.model,
            self.data,
            self.text_field,
            self.n_tokens,
            self.n_eval,
            self.seq_len,
            self.batch_size,
            self.shard_tokens,
        )


# ----- one layer ----------------------------------------------------------------------------------
def _sae_config(adapter: ModelAdapter, cfg: LayerwiseConfig, layer: int) -> SAEConfig:
    s = adapter.spec
    return SAEConfig(
        d_in=s.d_model,
        d_sae=cfg.n_features,
        k=cfg.k,
        site="resid",
        layers=(layer,),
        model_name=adapter.name,
        normalize_activations="expected_average_only_in",
        extra={"n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "d_head": s.d_head},
    )


def train_layer(
    adapter: ModelAdapter, cfg: LayerwiseConfig, layer: int, stream: Path
) -> tuple[SAE, TrainStats]:
    """Train layer ``layer``'s SAE from the captured stream (norm scale folded into the result)."""
    key = site_key("resid", (layer,))
    eval_rows = read_layer([stream / EVAL_FILE], key)  # [n_eval, d]
    rows = read_layer(shard_files(stream), key)  # [N, d]
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + layer)

    def chunks() -> Iterator[dict[str, torch.Tensor]]:
        yield {key: eval_rows}
        for _ in range(cfg.epochs):
            for part in torch.randperm(len(rows), generator=gen).split(8192):
                yield {key: rows[part]}

    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.n_features)
    saes, stats = train_saes(
        chunks(),
        {key: _sae_config(adapter, cfg, layer)},
        n_tokens=len(rows) * cfg.epochs,
        lr=lr,
        batch_size=cfg.sae_batch_size,
        n_eval=len(eval_rows),
        buffer_size=min(len(rows), 2**16),
        seed=cfg.seed + layer,
        device=adapter.device,
        log=None,
    )
    return saes[key].with_norm_scaling_folded(), stats[key]


@torch.no_grad()
def label_layer(
    adapter: ModelAdapter,
    sae: SAE,
    cfg: LayerwiseConfig,
    layer: int,
    stream: Path,
    folder: Path,
    *,
    context: int = 8,
    top: int = 8,
    n_promoted: int = 8,
) -> None:
    """``features.json`` for ``sae`` (norm scale folded) from the last ``cfg.label_tokens``
    training rows of the stream: the same cards as :func:`labels.label_features`, without
    another forward pass."""
    files = shard_files(stream)
    key = site_key("resid", (layer,))
    rows = read_layer(files, key)[-cfg.label_tokens :]  # [n, d]
    ids_all, locs = read_ids(files, cfg.seq_len)
    locs = locs[-cfg.label_tokens :]
    state = _TopK(sae.cfg.d_sae, 2 * top)
    for start in range(0, len(rows), 4096):
        part = rows[start : start + 4096].to(sae.W_dec.device)
        state.update(sae.encode(part).cpu(), locs[start : start + 4096])
    promoted = promoted_tokens(adapter, output_directions(adapter, sae), n_promoted)
    cards = _cards(adapter, state, ids_all, len(rows), promoted, context, top)
    write_json(folder / FEATURES_FILENAME, cards)
    first_seq = int(locs[0]) // cfg.seq_len if len(locs) else 0
    meta = LabelConfig(
        model=adapter.name,
        data=cfg.data,
        n_tokens=cfg.label_tokens,
        skip_sequences=held_out_sequences(stream) + first_seq,
        seq_len=cfg.seq_len,
        context=context,
        top=top,
        n_promoted=n_promoted,
        tokens_seen=len(rows),
    )
    write_json(folder / FEATURES_META_FILENAME, meta.to_dict(), indent=2)


# ----- every layer --------------------------------------------------------------------------------
def _done(folder: Path, cfg: LayerwiseConfig) -> bool:
    stats = folder / STATS_FILENAME
    return stats.is_file() and read_json(stats).get("config") == cfg.to_dict()


def layers_done(out: Path, cfg: LayerwiseConfig, layers: Sequence[int]) -> list[int]:
    """The layers of ``layers`` whose dictionary in ``out`` was made with ``cfg``."""
    return [layer for layer in layers if _done(out / site_key("resid", (layer,)), cfg)]


# One epoch of every layer's training (SAE steps in batches of 256, then its share of the labels
# and the error share) costs about 1.8 forward passes over the same tokens (default model, one
# CPU thread: capture 211 s, layers 759 s for 2 epochs, docs/dictionaries.md): the ETA's guess
# for the training until a layer has been timed.
SAE_EPOCH_PER_FORWARD = 1.8


class _Status:
    """``status.json``: what the run is doing, for a server that polls it."""

    def __init__(
        self,
        out: Path,
        layers: Sequence[int],
        done: Sequence[int],
        cfg: LayerwiseConfig,
        n_model_layers: int,
    ):
        self.path = out / STATUS_FILENAME
        self.t0 = time.time()
        self.d: dict[str, Any] = {
            "pid": os.getpid(),
            "phase": "capture",
            "layers": sorted(layers),
            "layers_done": sorted(done),
            "tokens": 0,
            "tokens_total": cfg.n_tokens,
            "started": self.t0,
            "eta_seconds": None,
        }
        self._train_factor = (
            SAE_EPOCH_PER_FORWARD * cfg.epochs * (len(layers) - len(done)) / n_model_layers
        )
        self._capture_t0: float | None = None
        self._capture_from = 0
        self._layer_times: list[float] = []
        self.write()

    def write(self) -> None:
        self.d["elapsed_seconds"] = round(time.time() - self.t0, 1)
        write_json(self.path, self.d, indent=2)

    def tokens(self, n: int) -> None:
        now = time.time()
        if self._capture_t0 is None:
            self._capture_t0, self._capture_from = now, self.d["tokens"] + n
        self.d["tokens"] += n
        done = self.d["tokens"] - self._capture_from
        if done > 0:
            per_token = max(now - self._capture_t0, 1e-9) / done
            left = (self.d["tokens_total"] - self.d["tokens"]) * per_token
            train = self.d["tokens_total"] * per_token * self._train_factor
            self.d["eta_seconds"] = round(left + train, 0)
        self.write()

    def phase(self, name: str) -> None:
        self.d["phase"] = name
        self.write()

    def layer_done(self, layer: int, seconds: float) -> None:
        self.d["layers_done"] = sorted({*self.d["layers_done"], layer})
        self._layer_times.append(seconds)
        left = len(self.d["layers"]) - len(self.d["layers_done"])
        self.d["eta_seconds"] = round(left * sum(self._layer_times) / len(self._layer_times), 0)
        self.write()


def train_layers(
    adapter: ModelAdapter,
    cfg: LayerwiseConfig,
    out: Path,
    layers: Sequence[int] | None = None,
    *,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
    keep_stream: bool = False,
) -> list[LayerQuality]:
    """Residual dictionaries for ``layers`` (default: all) into ``out``, from one stream.

    Layers already in ``out`` with these settings are kept; the rest are trained in the order
    given (so the ones a user wants first can come first), each saved, labelled and measured as
    soon as it is done. Returns the quality rows of every layer of ``layers`` (also in
    ``out/quality.json``). The stream is deleted at the end unless ``keep_stream``."""
    from headscope.progress import bar

    say = log or (lambda _msg: None)
    s = adapter.spec
    layers = list(range(s.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < s.n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {s.n_layers} layers")
    if not 1 <= cfg.k <= cfg.n_features:
        raise ValueError(f"need 1 <= k <= n_features, got k={cfg.k}, n={cfg.n_features}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stream = out / STREAM_DIR
    quality_file = out / QUALITY_FILENAME
    quality = {
        int(k): v for k, v in (read_json(quality_file) if quality_file.is_file() else {}).items()
    }
    done = layers_done(out, cfg, layers)
    todo = [layer for layer in layers if layer not in done]
    status = _Status(out, layers, done, cfg, s.n_layers)
    t0 = time.perf_counter()
    if todo:
        say(
            f"dictionaries: {len(todo)} of {len(layers)} layers of {adapter.name} to train "
            f"({cfg.n_features} features, k={cfg.k}, {cfg.n_tokens:,} tokens x {cfg.epochs} "
            f"epochs in batches of {cfg.sae_batch_size}), load average {os.getloadavg()[0]:.1f}; "
            f"{len(done)} cached in {out}"
        )
        with bar(cfg.n_tokens, "dictionaries: forward pass", "tok", enabled=progress) as b:

            def tick(n: int) -> None:
                b.update(n)
                status.tokens(n)

            capture_stream(adapter, cfg.stream(), todo, stream, on_tokens=tick)
        t_capture = time.perf_counter() - t0
        say(f"dictionaries: captured {len(todo)} layers in one pass in {t_capture:.0f} s")
        status.phase("train")
        session = None
        texts: list[list[int]] = []
        if cfg.edges > 0 and adapter.dtype == torch.float32:
            from headscope.analysis.session import Session

            session = Session(adapter)
            texts = held_out_texts(stream)
        with bar(len(todo), "dictionaries: layers", "layer", enabled=progress) as lb:
            for layer in todo:
                tl = time.perf_counter()
                sae, st = train_layer(adapter, cfg, layer, stream)
                folder = out / site_key("resid", (layer,))
                (folder / STATS_FILENAME).unlink(missing_ok=True)
                save_sae(sae, folder)
                if cfg.label_tokens > 0:
                    label_layer(adapter, sae, cfg, layer, stream, folder)
                share, worst = None, None
                if session is not None:
                    from headscope.dictionaries.basis import DictionarySet

                    share, worst = error_share(
                        session,
                        DictionarySet(folder).to(adapter.device),
                        layer,
                        texts,
                        cfg.edges,
                        cfg.seed,
                    )
                seconds = time.perf_counter() - tl
                q = LayerQuality(
                    layer=layer,
                    explained_variance=float(st.explained_variance or 0.0),
                    mean_l0=float(st.mean_l0 or 0.0),
                    dead_fraction=float(st.dead_fraction_eval or 0.0),
                    error_share=share,
                    n_edges=cfg.edges if share is not None else 0,
                    train_tokens=st.tokens,
                    seconds=round(seconds, 1),
                )
                quality[layer] = q.to_dict()
                write_json(quality_file, {str(k): quality[k] for k in sorted(quality)}, indent=2)
                record = {
                    "config": cfg.to_dict(),
                    "stats": st.to_dict(),
                    "quality": q.to_dict(),
                    "attribution_check": worst,
                    "load_average": round(os.getloadavg()[0], 2),
                }
                # Written last: a layer with stats.json is complete (a server may load it now).
                write_json(folder / STATS_FILENAME, record, indent=2)
                status.layer_done(layer, seconds)
                lb.update()
                say(
                    f"dictionaries: L{layer}: explained variance {q.explained_variance:.4f}, "
                    f"L0 {q.mean_l0:.1f}, dead {q.dead_fraction:.1%}, error share "
                    f"{'n/a' if share is None else f'{share:.3f}'} ({seconds:.0f} s)"
                )
        if not keep_stream and len(layers_done(out, cfg, layers)) == len(layers):
            shutil.rmtree(stream, ignore_errors=True)
    status.phase("done")
    rows = [LayerQuality(**quality[layer]) for layer in layers if layer in quality]
    say(format_quality(rows))
    say(f"dictionaries: {len(layers)} layers ready in {out} ({time.perf_counter() - t0:.0f} s)")
    return rows


__all__ = [
    "LayerwiseConfig",
    "label_layer",
    "layers_done",
    "train_layer",
    "train_layers",
]
