"""Train TopK sparse autoencoders (Gao et al. 2024) on a stream of activations.

The trainer never holds the dataset: it pulls chunks from the iterator it is given into a bounded
shuffle buffer (``buffer_size`` rows × Σ d_in floats) and draws random batches from it, refilling
the drawn slots from the stream. Several SAEs (e.g. one per layer) train in lockstep from one
stream of dicts, so one model forward pass feeds all of them.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): decoder rows kept at
unit norm (the gradient's component along each row is removed before the step, rows are
renormalised after it); W_enc initialised to W_dec.T; b_dec initialised to the geometric median
of a sample of the stream; loss = normalised MSE + 1/32 · AuxK, where AuxK reconstructs the
residual x − x̂ from the top-``aux_k`` latents that have not fired for ``dead_after_tokens``
tokens; Adam with eps 6.25e-10; lr linearly decayed to 0 over the last ``lr_decay_fraction``.

Only the k selected pre-activations take part in autograd: the dense [batch, d_sae] encoder
product is computed without a graph, and the backward passes use sparse products, so a step
costs about one dense matmul.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from headscope.dictionaries.sae import SAE, SAEConfig
from headscope.dictionaries.sparse_ops import GatheredEncode, SparseDecode

ADAM_EPS = 6.25e-10


@dataclass(frozen=True)
class TrainStats:
    """How well a trained SAE reconstructs held-out activations, and what training cost.

    ``normalized_mse`` is Σ‖x − x̂‖² / Σ‖x − mean(x)‖² on the held-out rows, i.e. MSE divided by
    the input variance; ``explained_variance`` is 1 − that. ``dead_fraction`` counts latents
    that did not fire in the last ``dead_after_tokens`` training tokens (or the whole run if
    shorter); ``dead_fraction_eval`` those that never fire on the held-out rows. Eval fields are
    None when ``n_eval`` is 0.
    """

    normalized_mse: float | None
    explained_variance: float | None
    mean_l0: float | None
    dead_fraction: float
    dead_fraction_eval: float | None
    tokens: int
    steps: int
    seconds: float
    tokens_per_second: float
    n_eval: int
    dead_after_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainStats:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@torch.no_grad()
def geometric_median(x: Tensor, *, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """[N, D] -> [D] point minimising Σ‖x_i − y‖ (Weiszfeld iterations from the mean)."""
    x = x.to(torch.float64)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-12)  # [N]
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * (y.norm() + tol)
        y = y_new
        if done:
            break
    return y.to(torch.float32)


def _as_rows(t: Tensor, d_in: int, name: str) -> Tensor:
    """[..., d_in] or [..., n_heads, d_head] (n_heads·d_head = d_in) -> [N, d_in]."""
    if t.shape[-1] == d_in or (t.dim() >= 2 and t.shape[-1] * t.shape[-2] == d_in):
        return t.reshape(-1, d_in)
    raise ValueError(f"activations for {name!r} have shape {list(t.shape)}; expected [..., {d_in}]")


class _RowSource:
    """Pulls rows lazily from an iterator of {name: Tensor[..., d_in]} chunks.

    The SAEs' inputs are concatenated along the feature dim: one row [Σ d_in] per token.
    """

    def __init__(
        self, chunks: Iterator[Mapping[str, Tensor]], d_ins: Mapping[str, int], device: torch.device
    ):
        self._chunks = chunks
        self._d_ins = dict(d_ins)
        self._device = device
        self.width = sum(self._d_ins.values())
        self._pending: Tensor | None = None  # [n, width], rows not handed out yet
        self.exhausted = False

    def _next_chunk(self) -> Tensor | None:
        while not self.exhausted:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self.exhausted = True
                return None
            if set(chunk) != set(self._d_ins):
                raise ValueError(
                    f"activation chunk has keys {sorted(chunk)}; expected {sorted(self._d_ins)}"
                )
            parts = [
                _as_rows(chunk[name], d_in, name).to(self._device, torch.float32)
                for name, d_in in self._d_ins.items()
            ]
            n_rows = {part.shape[0] for part in parts}
            if len(n_rows) != 1:
                raise ValueError(
                    f"activation chunk entries disagree on the number of tokens: {sorted(n_rows)}"
                )
            if parts[0].shape[0]:
                return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return None

    def take(self, n: int) -> Tensor:
        """Up to n rows [<= n, width]; fewer only when the stream has ended."""
        pieces: list[Tensor] = []
        got = 0
        while got < n:
            if self._pending is None or len(self._pending) == 0:
                self._pending = self._next_chunk()
                if self._pending is None:
                    break
            piece, self._pending = self._pending[: n - got], self._pending[n - got :]
            pieces.append(piece)
            got += len(piece)
        if not pieces:
            return torch.empty(0, self.width, device=self._device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _ShuffleBuffer:
    """A fixed-capacity pool of rows; each batch is a uniform random draw from the pool, and the
    drawn slots are refilled from the stream (so memory stays at ``capacity`` rows)."""

    def __init__(self, source: _RowSource, capacity: int, generator: torch.Generator):
        self._source = source
        self._gen = generator
        self._buf = torch.empty(capacity, source.width, device=source._device)  # [capacity, width]
        self._n = 0
        rows = source.take(capacity)
        self._buf[: len(rows)] = rows
        self._n = len(rows)

    def sample(self, n: int) -> Tensor:
        """n random rows [<= n, width] without removing them."""
        idx = torch.randperm(self._n, generator=self._gen)[:n].to(self._buf.device)
        return self._buf[idx]

    def next_batch(self, n: int) -> Tensor | None:
        """n random rows [<= n, width], removed and replaced from the stream; None when empty."""
        if self._n == 0:
            return None
        m = min(n, self._n)
        idx = torch.randperm(self._n, generator=self._gen)[:m].to(self._buf.device)
        batch = self._buf[idx]
        fresh = self._source.take(m)
        r = len(fresh)
        self._buf[idx[:r]] = fresh
        if r < m:
            # Stream ended: shrink the pool, moving live tail rows into the unfilled holes.
            holes = idx[r:]
            new_n = self._n - len(holes)
            is_hole = torch.zeros(self._n, dtype=torch.bool, device=self._buf.device)
            is_hole[holes] = True
            low_holes = holes[holes < new_n]
            tail = torch.arange(new_n, self._n, device=self._buf.device)
            tail = tail[~is_hole[new_n:]]
            self._buf[low_holes] = self._buf[tail]
            self._n = new_n
        return batch


class _TopKTrainer:
    """Optimiser state and dead-latent bookkeeping of one SAE."""

    def __init__(self, sae: SAE, *, lr: float, aux_k: int, aux_coef: float, dead_after_tokens: int):
        assert sae.cfg.k is not None
        self.sae = sae
        self.k: int = sae.cfg.k
        self.aux_k = aux_k
        self.aux_coef = aux_coef
        self.dead_after_tokens = dead_after_tokens
        self.base_lr = lr
        # foreach: torch only defaults to the multi-tensor Adam on GPU; on CPU it is ~3x faster too.
        self.opt = torch.optim.Adam(
            sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, foreach=True
        )
        self.since_fired = torch.zeros(
            sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device
        )  # [d_sae]
        self.tokens = 0

    def set_lr_factor(self, factor: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * factor

    def step(self, x_raw: Tensor) -> tuple[float, float]:
        """One Adam step on x_raw [B, d_in]; returns (normalised MSE, mean L0) of the batch."""
        sae = self.sae
        x = sae.scale_input(x_raw)  # [B, d_in]
        x_c = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x  # [B, d_in]
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)  # [B, d_sae]
            top_vals, top_idx = pre.topk(self.k, dim=-1, sorted=False)  # [B, k]
            centered = x - x.mean(0)
            total_var = centered.pow(2).sum().clamp_min(1e-12)
        acts = GatheredEncode.apply(x_c, sae.W_enc, sae.b_enc, top_idx, top_vals).relu()  # [B, k]
        recon = SparseDecode.apply(top_idx, acts, sae.W_dec) + sae.b_dec  # [B, d_in]
        fvu = (recon - x).pow(2).sum() / total_var
        loss = fvu

        dead = self.since_fired >= self.dead_after_tokens  # [d_sae]
        n_dead = int(dead.sum())
        if n_dead and self.aux_coef > 0:
            k_aux = min(self.aux_k, n_dead)
            with torch.no_grad():
                masked = pre.masked_fill_(~dead, -math.inf)  # pre is not needed after this
                aux_vals, aux_idx = masked.topk(k_aux, dim=-1, sorted=False)  # [B, k_aux]
            aux_acts = GatheredEncode.apply(x_c, sae.W_enc, sae.b_enc, aux_idx, aux_vals)
            aux_recon = SparseDecode.apply(aux_idx, aux_acts, sae.W_dec)  # [B, d_in]
            residual = (x - recon).detach()
            aux = (aux_recon - residual).pow(2).sum() / total_var
            # Few dead latents -> proportionally smaller aux loss (as SAELens / sparsify).
            loss = loss + self.aux_coef * min(n_dead / self.aux_k, 1.0) * aux
        del pre

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = sae.W_dec, sae.W_dec.grad  # [d_sae, d_in] each
            assert g is not None
            g -= (g * w).sum(-1, keepdim=True) * w
        self.opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
            active = acts > 0  # [B, k]
            fired = torch.zeros_like(dead)
            fired[top_idx[active]] = True
            self.since_fired += x_raw.shape[0]
            self.since_fired[fired] = 0
        self.tokens += x_raw.shape[0]
        return float(fvu.detach()), float(active.sum()) / x_raw.shape[0]

    def dead_fraction(self) -> float:
        window = min(self.dead_after_tokens, max(self.tokens, 1))
        return float((self.since_fired >= window).float().mean())


@torch.no_grad()
def _evaluate(sae: SAE, rows: Tensor, batch_size: int) -> tuple[float, float, float, float]:
    """rows [N, d_in] raw -> (normalised MSE, explained variance, mean L0, never-fired fraction)."""
    err2 = torch.zeros((), dtype=torch.float64)
    sum_x = torch.zeros(rows.shape[1], dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=rows.device)
    for start in range(0, len(rows), batch_size):
        x = rows[start : start + batch_size]  # [b, d_in]
        acts = sae.encode(x)  # [b, d_sae]
        recon = sae.decode(acts)  # [b, d_in]
        err2 += (x - recon).double().pow(2).sum().cpu()
        sum_x += x.double().sum(0).cpu()
        sum_x2 += x.double().pow(2).sum().cpu()
        active = acts > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    n = len(rows)
    total_var = float(sum_x2 - sum_x.pow(2).sum() / n)
    nmse = float(err2) / max(total_var, 1e-30)
    return nmse, 1.0 - nmse, l0 / n, 1.0 - float(fired.float().mean())


def _init_seed(seed: int, i: int) -> int:
    # Mixed so the init never replays a stream the caller generated with the same small seed.
    return (seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**63


def train_saes(
    activations: Iterable[Mapping[str, Tensor]],
    cfgs: Mapping[str, SAEConfig],
    *,
    n_tokens: int,
    lr: float | None = None,
    batch_size: int = 4096,
    aux_k: int | None = None,
    aux_coef: float = 1 / 32,
    dead_after_tokens: int | None = None,
    buffer_size: int = 2**16,
    n_eval: int = 8192,
    lr_decay_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = print,
    log_every: int = 50,
) -> tuple[dict[str, SAE], dict[str, TrainStats]]:
    """Train one TopK SAE per entry of ``cfgs`` in lockstep from one activation stream.

    activations: iterable of ``{name: Tensor[..., d_in]}`` chunks (same names as ``cfgs``, same
        token count per entry); ``[..., n_heads, d_head]`` is flattened. The first ``n_eval``
        rows are held out for the returned stats; the next ``n_tokens`` rows train.
    lr: Adam learning rate; default 2e-4 / sqrt(d_sae / 2^14) (Gao et al.), per SAE.
    aux_k: dead latents used by the AuxK loss; default d_in // 2.
    dead_after_tokens: a latent is dead after this many tokens without firing; default
        min(1M, n_tokens // 5), at least one batch.
    buffer_size: rows held in the shuffle buffer (memory: buffer_size × Σ d_in × 4 bytes).

    Each config with ``normalize_activations="expected_average_only_in"`` and no
    ``norm_scaling_factor`` gets sqrt(d_in) / E‖x‖ measured on the first buffer, stored in the
    returned SAE's config. Returns ({name: SAE}, {name: TrainStats}).
    """
    if not cfgs:
        raise ValueError("cfgs is empty")
    for name, cfg in cfgs.items():
        if cfg.architecture != "topk":
            raise ValueError(
                f"{name}: only topk SAEs can be trained, got architecture {cfg.architecture!r}"
            )
    if n_tokens <= 0 or batch_size <= 0:
        raise ValueError("n_tokens and batch_size must be positive")
    device = torch.device(device)
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)

    source = _RowSource(iter(activations), {name: cfg.d_in for name, cfg in cfgs.items()}, device)
    eval_rows = source.take(n_eval)  # [n_eval, Σ d_in]
    buffer = _ShuffleBuffer(source, max(buffer_size, batch_size), gen)
    sample = buffer.sample(batch_size)  # [<= batch_size, Σ d_in]
    if len(sample) == 0:
        raise ValueError("the activation stream yielded no training rows")
    dead_after = dead_after_tokens or max(batch_size, min(1_000_000, n_tokens // 5))

    trainers: dict[str, _TopKTrainer] = {}
    slices: dict[str, slice] = {}
    offset = 0
    for i, (name, cfg) in enumerate(cfgs.items()):
        slices[name] = slice(offset, offset + cfg.d_in)
        offset += cfg.d_in
        x0 = sample[:, slices[name]]  # [b, d_in]
        if (
            cfg.normalize_activations == "expected_average_only_in"
            and cfg.norm_scaling_factor is None
        ):
            cfg = replace(
                cfg,
                norm_scaling_factor=math.sqrt(cfg.d_in)
                / float(x0.norm(dim=-1).mean().clamp_min(1e-12)),
            )
        sae = SAE(cfg, generator=torch.Generator().manual_seed(_init_seed(seed, i))).to(device)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(sae.scale_input(x0).cpu()).to(sae.b_dec))
        trainers[name] = _TopKTrainer(
            sae,
            lr=lr if lr is not None else 2e-4 / math.sqrt(cfg.d_sae / 2**14),
            aux_k=aux_k if aux_k is not None else max(1, cfg.d_in // 2),
            aux_coef=aux_coef,
            dead_after_tokens=dead_after,
        )

    tokens = steps = 0
    t_loop = time.perf_counter()
    window: dict[str, list[tuple[float, float]]] = {name: [] for name in cfgs}
    decay_tokens = lr_decay_fraction * n_tokens
    while tokens < n_tokens:
        batch = buffer.next_batch(min(batch_size, n_tokens - tokens))  # [b, Σ d_in]
        if batch is None:
            say(f"sae: activation stream ended after {tokens:,} of {n_tokens:,} training tokens")
            break
        factor = min(1.0, (n_tokens - tokens) / decay_tokens) if decay_tokens > 0 else 1.0
        for name, trainer in trainers.items():
            trainer.set_lr_factor(factor)
            window[name].append(trainer.step(batch[:, slices[name]]))
        tokens += len(batch)
        steps += 1
        if log is not None and (steps % log_every == 0 or tokens >= n_tokens):
            rate = tokens / max(time.perf_counter() - t_loop, 1e-9)
            parts = []
            for name, trainer in trainers.items():
                fvu = sum(f for f, _ in window[name]) / len(window[name])
                l0 = sum(l0 for _, l0 in window[name]) / len(window[name])
                parts.append(
                    f"{name}: fvu {fvu:.4f} L0 {l0:.1f} dead {trainer.dead_fraction():.1%}"
                )
                window[name].clear()
            say(
                f"sae step {steps:>6} tokens {tokens:>11,} {rate:>8,.0f} tok/s | "
                + " | ".join(parts)
            )
    loop_seconds = time.perf_counter() - t_loop

    saes: dict[str, SAE] = {}
    stats: dict[str, TrainStats] = {}
    for name, trainer in trainers.items():
        sae = trainer.sae.eval().requires_grad_(False)
        metrics: tuple[float | None, ...] = (None, None, None, None)
        if len(eval_rows):
            metrics = _evaluate(sae, eval_rows[:, slices[name]], batch_size)
        nmse, ev, mean_l0, dead_eval = metrics
        saes[name] = sae
        stats[name] = TrainStats(
            normalized_mse=nmse,
            explained_variance=ev,
            mean_l0=mean_l0,
            dead_fraction=trainer.dead_fraction(),
            dead_fraction_eval=dead_eval,
            tokens=tokens,
            steps=steps,
            seconds=time.perf_counter() - t_start,
            tokens_per_second=tokens / max(loop_seconds, 1e-9),
            n_eval=len(eval_rows),
            dead_after_tokens=dead_after,
        )
    return saes, stats


def train_sae(
    activations: Iterable[Tensor],
    cfg: SAEConfig,
    *,
    n_tokens: int,
    **kwargs: Any,
) -> tuple[SAE, TrainStats]:
    """Train one TopK SAE from an iterable of ``Tensor[..., d_in]`` chunks.

    Same keywords as :func:`train_saes` (lr, batch_size, aux_k, dead_after_tokens, buffer_size,
    n_eval, seed, device, log, ...).
    """
    saes, stats = train_saes(
        ({"sae": chunk} for chunk in activations), {"sae": cfg}, n_tokens=n_tokens, **kwargs
    )
    return saes["sae"], stats["sae"]
