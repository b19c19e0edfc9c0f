"""Stream a dataset through a model and record every head; resumable and shardable.

One forward pass per batch reduces each layer's patterns into the accumulators of
:class:`StreamState` as the layer runs (nothing T^2 outlives its layer). Every
``checkpoint_every`` batches the whole state is saved atomically, so a killed run resumes from
its last checkpoint and ends with exactly the result of an uninterrupted one. Under ``torchrun``
each rank takes every ``world``-th sequence; rank 0 merges the ranks' final states from their
checkpoint files (no pickle) and writes the run directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from headscope.data.readers import ReadReport, check_readable
from headscope.files import read_json, read_tensors, write_json, write_tensors
from headscope.metrics.registry import LayerBatch, TokenMatches
from headscope.model import ModelAdapter
from headscope.model.capture import LayerTensors, query_block_for, query_blocks
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.sequences import Sequence, batched, iter_sequences, stack
from headscope.precompute.state import StreamState
from headscope.store.run_format import SCHEMA_VERSION


def dataset_hash(path: Path) -> str:
    """sha256 over the dataset's files (sorted relative paths and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = (
            "nccl"
            if torch.cuda.is_available() and os.environ.get("HEADSCOPE_BACKEND") != "gloo"
            else "gloo"
        )
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def head_out_norm(adapter: ModelAdapter, z: torch.Tensor, layer: int) -> torch.Tensor:
    """||z_h @ W_O[h]|| for ``z [B, T, H, D]`` -> ``[B, H, T]``, in each head's D-dim output
    basis (:meth:`ModelAdapter.output_basis`: the same norms at D/d_model of the cost)."""
    basis = adapter.output_basis(layer)  # [H, D, D]
    return torch.linalg.vector_norm(torch.matmul(z.transpose(1, 2).float(), basis), dim=-1)


def process_batch(
    adapter: ModelAdapter,
    state: StreamState,
    layers: list[int],
    batch: list[Sequence],
    query_block: int | None = None,
) -> None:
    """One forward pass over ``batch``; every captured layer becomes a :class:`LayerBatch`
    that each accumulator of ``state`` reduces before the next layer runs.

    ``query_block``: compute each layer's patterns this many query rows at a time (one
    :class:`LayerBatch` per block), so memory grows with ``T x query_block``, not ``T^2``;
    None: whole layers (:func:`query_block_for` picks a size)."""
    packed = stack(batch, adapter.tokens.bos_id)
    ids, valid = packed.ids, packed.valid
    s = adapter.spec
    rep = s.n_heads // s.n_kv_heads
    per_layer: dict[str, torch.Tensor] = {}  # q, k, v_o of the layer whose blocks arrive
    # The batch's tokens, masks and matches where each layer's patterns are (a model sharded
    # over devices has its layers on several), so every reduction runs on that device.
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor, TokenMatches]]
    on_device = {}

    def batch_on(device: torch.device):
        if device not in on_device:
            d_ids, d_valid = ids.to(device), valid.to(device)
            on_device[device] = (
                d_ids,
                d_valid,
                packed.doc_start.to(device),
                TokenMatches.from_tokens(d_ids, d_valid),
            )
        return on_device[device]

    def on_layer(t: LayerTensors) -> None:
        if t.row_start == 0:
            k = t.k.repeat_interleave(rep, 1).float()  # [B, H, T, D]
            v = t.v.repeat_interleave(rep, 1).float()
            basis = adapter.output_basis(t.layer)
            per_layer["v_o"] = torch.einsum("bhtd,hde->bhte", v, basis)  # [B, H, T, D]
            per_layer["k"], per_layer["q"] = k, t.q.float()
        pattern = t.weights().float()  # [B, H, r, S]
        rows = slice(t.row_start, t.row_start + pattern.shape[2])
        d_ids, d_valid, d_doc_start, matches = batch_on(pattern.device)
        state.update(
            LayerBatch(
                t.layer,
                pattern,
                d_ids,
                d_doc_start,
                head_out_norm(adapter, t.z[:, rows], t.layer),
                d_valid,
                matches=matches,
                seq_idx=packed.index,
                q=per_layer["q"],
                k=per_layer["k"],
                v_o=per_layer["v_o"],
                row_start=t.row_start,
            )
        )

    with query_blocks(query_block):
        adapter.run(
            ids.to(adapter.device),
            layers=layers,
            patterns=True,
            logits=False,
            store=False,
            on_layer=on_layer,
            stop_after=max(layers),
        )
    state.finish_batch(len(batch), int(valid.sum()))


def _check_existing(out: Path, cfg: PrecomputeConfig) -> bool:
    """True if ``out`` already holds this exact run complete; raise if it holds another run."""
    manifest = out / "manifest.json"
    if not manifest.exists():
        if out.exists() and any(p.name != "checkpoint" for p in out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a headscope run; choose another --out")
        return False
    found = read_json(manifest)
    try:  # settings added since the run was made take their defaults
        same = PrecomputeConfig.from_dict(found.get("config") or {}).to_dict() == cfg.to_dict()
    except (TypeError, ValueError):
        same = False
    if not same:
        raise FileExistsError(
            f"{out} holds a run with a different configuration; choose another --out or delete it"
        )
    return found.get("status") == "complete"


def run_precompute(cfg: PrecomputeConfig, out: Path | str, *, progress: bool = True) -> Path:
    """Run (or resume) a precompute into the run directory ``out``; return its path."""
    out = Path(out)
    rank, world = _dist()
    if _check_existing(out, cfg):
        return out
    if cfg.data is None:
        from headscope.data.corpus import ensure_default_corpus

        data = ensure_default_corpus()
    else:
        data = Path(cfg.data)
    # Unusable data fails here, before the model loads and before the run folder exists.
    check_readable(data, text_field=cfg.text_field)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    t_load = time.perf_counter()
    adapter = ModelAdapter.load(cfg.model, device=cfg.device, dtype=dtype)
    load_s = time.perf_counter() - t_load
    s = adapter.spec
    cfg.validate(s.n_layers)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(s.n_layers))
    t_start = time.perf_counter()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / "manifest.json",
            {"schema_version": SCHEMA_VERSION, "status": "running", "config": cfg.to_dict()},
            indent=2,
        )
    _barrier(world)

    ckpt = out / "checkpoint" / f"rank{rank}-of-{world}.safetensors"
    state = StreamState(s, cfg)
    if ckpt.exists():
        state.load_state_dict(read_tensors(ckpt))
        if progress:
            print(f"[rank {rank}] resuming after {state.sequences_done} sequences", file=sys.stderr)
    report = ReadReport()
    mine = (
        q
        for q in iter_sequences(
            adapter.tokens,
            data,
            cfg.seq_len,
            text_field=cfg.text_field,
            limit=cfg.n_sequences,
            report=report,
        )
        if q.index % world == rank
    )
    for _ in range(state.sequences_done):
        next(mine, None)
    total = len(range(rank, cfg.n_sequences, world))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=total * cfg.seq_len,
            initial=state.tokens_done,
            unit="tok",
            unit_scale=True,
            desc="precompute",
            file=sys.stderr,
        )
    block = cfg.query_block or query_block_for(cfg.batch_size, s.n_heads, cfg.seq_len)
    forward_s = 0.0
    try:
        for n_batch, batch in enumerate(batched(mine, cfg.batch_size), start=1):
            t0 = time.perf_counter()
            process_batch(adapter, state, layers, batch, block)
            forward_s += time.perf_counter() - t0
            if bar is not None:
                bar.update(sum(q.ids.shape[0] for q in batch))
            if n_batch % cfg.checkpoint_every == 0:
                write_tensors(ckpt, state.state_dict())
    finally:  # also on Ctrl-C: the bar's line ends before the message that follows it
        if bar is not None:
            bar.close()
    write_tensors(ckpt, state.state_dict())
    if report.skipped and progress:
        print(f"[rank {rank}] {report.summary()}", file=sys.stderr)
    _barrier(world)
    if rank == 0:
        for other in range(1, world):
            part = StreamState(s, cfg)
            part.load_state_dict(
                read_tensors(out / "checkpoint" / f"rank{other}-of-{world}.safetensors")
            )
            state.merge(part)
        from headscope.precompute.finalize import finalize

        finalize(
            adapter,
            cfg,
            state,
            out,
            layers=layers,
            dataset={"path": str(data), "sha256": dataset_hash(data), "skipped": report.skipped},
            timings={
                "load_s": round(load_s, 3),
                "stream_s": round(forward_s, 3),
                "total_s": round(time.perf_counter() - t_start, 3),
            },
            progress=progress,
        )
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    _barrier(world)
    return out
