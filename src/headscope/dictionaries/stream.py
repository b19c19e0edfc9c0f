"""Residual rows of every layer from one pass over a dataset, kept on disk between uses.

A stream folder holds ``eval.safetensors`` (the first ``n_eval`` rows, float32, held out) and
``shard_00000.safetensors``, ... (about ``shard_tokens`` training rows each, bfloat16), each with
``resid_L{l}`` ``[rows, d_model]`` per layer, ``ids`` ``[sequences, seq_len]`` (the packed
sequences, -1 = padding) and ``locs`` ``[rows]`` (``sequence * seq_len + position`` of each row in
that file), and metadata ``rows`` and ``sequences_end`` (sequences of the dataset read so far).
Every file is written atomically, so an interrupted capture resumes after its last whole shard;
``config.json`` records the settings and layers (a folder made with other settings is discarded).
The BOS position (an attention sink with ~100x the norm of other positions) and padding are left
out.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from headscope.dictionaries.activations import capture_sites
from headscope.files import read_json, write_json, write_tensors
from headscope.model import ModelAdapter
from headscope.precompute.sequences import batched, iter_sequences, stack

EVAL_FILE = "eval.safetensors"


@dataclass(frozen=True)
class StreamConfig:
    """What a stream's rows depend on."""

    model: str
    data: str
    text_field: str
    n_tokens: int  # training rows (the last shard may hold a few more)
    n_eval: int  # held-out rows (whole batches: a few more)
    seq_len: int
    batch_size: int  # sequences per forward pass
    shard_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_files(stream: Path) -> list[Path]:
    return sorted(stream.glob("shard_*.safetensors"))


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata() or {}


def _captured(stream: Path) -> tuple[int, int]:
    """(training rows, sequences read) of the whole shards in ``stream``."""
    rows = seqs = 0
    eval_file = stream / EVAL_FILE
    if eval_file.is_file():
        seqs = int(_meta(eval_file)["sequences_end"])
    for f in shard_files(stream):
        m = _meta(f)
        rows += int(m["rows"])
        seqs = int(m["sequences_end"])
    return rows, seqs


def _write_shard(
    path: Path,
    parts: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]],
    seq_len: int,
    dtype: torch.dtype,
    sequences_end: int,
) -> int:
    """Rows of the batches in ``parts`` ((ids [B, T], keep [B, T], {key: [B, T, d]})) -> file."""
    ids_all: list[torch.Tensor] = []
    locs: list[torch.Tensor] = []
    acts_all: dict[str, list[torch.Tensor]] = {}
    n_seq = 0
    for ids, keep, acts in parts:
        B, T = ids.shape
        padded = torch.full((B, seq_len), -1, dtype=torch.int32)
        padded[:, :T] = ids.to(torch.int32)
        ids_all.append(padded)
        loc = (n_seq + torch.arange(B))[:, None] * seq_len + torch.arange(T)[None, :]  # [B, T]
        locs.append(loc[keep])
        for key, a in acts.items():
            acts_all.setdefault(key, []).append(a)
        n_seq += B
    tensors = {key: torch.cat(v) for key, v in acts_all.items()}
    rows = len(torch.cat(locs))
    tensors["ids"] = torch.cat(ids_all)  # [S, seq_len], -1 = padding
    tensors["locs"] = torch.cat(locs).to(torch.int64)  # [rows] seq * seq_len + pos in this file
    meta = {"rows": str(rows), "sequences_end": str(sequences_end), "dtype": str(dtype)}
    write_tensors(path, tensors, metadata=meta)
    return rows


def capture_stream(
    adapter: ModelAdapter,
    cfg: StreamConfig,
    layers: Sequence[int],
    stream: Path,
    *,
    on_tokens: Callable[[int], None] | None = None,
) -> None:
    """Capture (or finish capturing) the residual rows of ``layers`` into ``stream``.

    One forward pass per batch feeds every layer (it stops after the deepest one). The first
    ``cfg.n_eval`` rows go to the held-out file (float32), the next ``cfg.n_tokens`` to shards
    (bfloat16). ``on_tokens(n)``: called with the rows each batch added."""
    stream.mkdir(parents=True, exist_ok=True)
    key_file = stream / "config.json"
    found = read_json(key_file) if key_file.is_file() else None
    if found is not None and (
        {k: v for k, v in found.items() if k != "layers"} == cfg.to_dict()
        and set(layers) <= set(found["layers"])
    ):
        layers = found["layers"]  # a stream begun for more layers goes on with all of them
    elif found is not None:
        shutil.rmtree(stream)  # captured with other settings: its rows are not these
        stream.mkdir(parents=True)
    write_json(key_file, cfg.to_dict() | {"layers": sorted(layers)}, indent=2)
    sites: list[tuple[str, tuple[int, ...]]] = [("resid", (layer,)) for layer in sorted(layers)]
    rows_done, seqs_done = _captured(stream)
    if on_tokens is not None and rows_done:
        on_tokens(rows_done)
    eval_done = (stream / EVAL_FILE).is_file()
    if eval_done and rows_done >= cfg.n_tokens:
        return
    seqs = iter_sequences(adapter.tokens, Path(cfg.data), cfg.seq_len, text_field=cfg.text_field)
    for _ in range(seqs_done):
        next(seqs, None)
    parts: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    pending = 0
    n_shard = len(shard_files(stream))
    for batch in batched(seqs, cfg.batch_size):
        packed = stack(batch, adapter.tokens.bos_id)
        keep = packed.valid.clone()
        keep[:, 0] = False  # the BOS sink: an outlier with ~100x the norm of other positions
        acts = capture_sites(adapter, packed.ids, sites)
        dtype = torch.float32 if not eval_done else torch.bfloat16
        kept = {k: v[keep].to("cpu", dtype) for k, v in acts.items()}  # [n, d] each
        del acts
        parts.append((packed.ids.cpu(), keep, kept))
        n = int(keep.sum())
        pending += n
        seqs_done += len(batch)
        if eval_done and on_tokens is not None:
            on_tokens(n)
        target = cfg.n_eval if not eval_done else min(cfg.shard_tokens, cfg.n_tokens - rows_done)
        if pending < target:
            continue
        if not eval_done:
            _write_shard(stream / EVAL_FILE, parts, cfg.seq_len, torch.float32, seqs_done)
            eval_done = True
        else:
            rows_done += _write_shard(
                stream / f"shard_{n_shard:05d}.safetensors",
                parts,
                cfg.seq_len,
                torch.bfloat16,
                seqs_done,
            )
            n_shard += 1
        parts, pending = [], 0
        if rows_done >= cfg.n_tokens:
            return
    if parts and eval_done:  # the data ended: keep what it gave
        _write_shard(
            stream / f"shard_{n_shard:05d}.safetensors",
            parts,
            cfg.seq_len,
            torch.bfloat16,
            seqs_done,
        )
    elif not eval_done:
        raise ValueError(f"{cfg.data} has fewer than {cfg.n_eval} tokens for held-out rows")


def read_layer(files: Sequence[Path], key: str) -> torch.Tensor:
    """One layer's rows from the stream files, in order, as float32 ``[N, d]``."""
    parts = []
    for f in files:
        with safe_open(str(f), "pt") as fh:
            parts.append(fh.get_tensor(key).float())
    return torch.cat(parts)


def read_ids(files: Sequence[Path], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [S, seq_len] of every sequence, locs [N] of every row into them) over ``files``."""
    ids, locs = [], []
    offset = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            file_ids = fh.get_tensor("ids").long()
            locs.append(fh.get_tensor("locs") + offset * seq_len)
        ids.append(file_ids)
        offset += len(file_ids)
    return torch.cat(ids), torch.cat(locs)


def held_out_sequences(stream: Path) -> int:
    """Sequences of the held-out file (the training shards' sequences follow them)."""
    return int(_meta(stream / EVAL_FILE)["sequences_end"])


def held_out_texts(stream: Path, n: int = 2) -> list[list[int]]:
    """The first ``n`` held-out sequences as token ids (BOS first, padding dropped)."""
    with safe_open(str(stream / EVAL_FILE), "pt") as fh:
        ids = fh.get_tensor("ids")[:n]  # [n, seq_len]
    return [[int(t) for t in row if t >= 0] for row in ids]
