"""Every accumulator of the precompute implements one protocol: one pass over a batch gives the
same state as two passes over its halves, merged (in either order), and the state survives a
safetensors round trip and keeps accumulating after it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from headscope.metrics import Accumulator, LayerBatch, MetricAccumulator
from headscope.precompute.examples import Examples
from headscope.precompute.motifs import MotifFeatures
from headscope.precompute.pca import PairCollector
from headscope.precompute.toptokens import TopTokens

L, H, T, D = 2, 3, 64, 4
SEQ_IDX = torch.tensor([7, 2, 11, 0, 5, 3])  # dataset indices of the batch's sequences

ACCUMULATORS: dict[str, Callable[[], Accumulator]] = {
    "metrics": lambda: MetricAccumulator(L, H),
    "examples": lambda: Examples(L, H, top_k=2, per_bucket=1, seed=3),
    "top_tokens": lambda: TopTokens(L, H),
    "pairs": lambda: PairCollector(L, H, D, D, n_pairs=12),
    "motifs": lambda: MotifFeatures(L, H, n_sequences=6),  # sequences 7 and 11 are left out
}


def layer_batch(layer: int, seq_idx: torch.Tensor, seed: int = 0) -> LayerBatch:
    """One layer of a batch of the given sequences; each sequence's tensors depend only on its
    index, the layer and ``seed`` (so the halves of a batch are slices of the whole)."""
    parts = []
    for s in seq_idx.tolist():
        g = torch.Generator().manual_seed(1000 * seed + 10 * s + layer)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        logits = torch.randn(H, T, T, generator=g) * 3
        pattern = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # [H, T, T]
        tokens = torch.randint(0, 9, (T,), generator=g)  # few distinct tokens: many matches
        tensors = [torch.randn(H, T, D, generator=g) for _ in range(3)]  # q, k, v_o
        parts.append((pattern, tokens, torch.rand(H, T, generator=g), *tensors))
    pattern, tokens, out_norm, q, k, v_o = (torch.stack(p) for p in zip(*parts, strict=True))
    valid = torch.ones(len(parts), T, dtype=torch.bool)
    valid[seq_idx == 2, 50:] = False  # sequence 2 ends in padding
    doc_start = tokens == 0
    doc_start[:, 0] = True
    return LayerBatch(
        layer, pattern, tokens, doc_start, out_norm, valid, seq_idx=seq_idx, q=q, k=k, v_o=v_o
    )


def feed(acc: Accumulator, seq_idx: torch.Tensor, seed: int = 0) -> Accumulator:
    for layer in range(L):
        acc.update(layer_batch(layer, seq_idx, seed))
    return acc


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        if value.dtype == torch.float64:  # sums: equal up to float64 rounding
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)
        else:  # selections, counts, stored vectors: identical
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", ACCUMULATORS)
@pytest.mark.parametrize("split", [1, 3])
def test_two_halves_merged_equal_one_pass(name, split):
    make = ACCUMULATORS[name]
    whole = feed(make(), SEQ_IDX).state_dict()
    for first, second in ((SEQ_IDX[:split], SEQ_IDX[split:]), (SEQ_IDX[split:], SEQ_IDX[:split])):
        a, b = feed(make(), first), feed(make(), second)
        a.merge(b)
        assert_same_state(a.state_dict(), whole)


@pytest.mark.parametrize("name", ACCUMULATORS)
def test_state_round_trip_and_resume(name, tmp_path):
    make = ACCUMULATORS[name]
    acc = feed(make(), SEQ_IDX[:4])
    save_file(acc.state_dict(), tmp_path / "state.safetensors")
    back = make()
    back.load_state_dict(load_file(tmp_path / "state.safetensors"))
    assert_same_state(back.state_dict(), acc.state_dict())
    for a in (acc, back):  # both keep accumulating: a resumed stream ends where one stream does
        feed(a, SEQ_IDX[4:])
    assert_same_state(back.state_dict(), acc.state_dict())
    assert_same_state(acc.state_dict(), feed(make(), SEQ_IDX).state_dict())


def test_an_accumulator_asks_for_what_the_batch_lacks():
    full = layer_batch(0, SEQ_IDX[:2])
    bare = LayerBatch(0, full.pattern, full.tokens, full.doc_start, full.head_out_norm, full.valid)
    MetricAccumulator(L, H).update(bare)  # metrics need nothing optional
    with pytest.raises(ValueError, match="LayerBatch.seq_idx"):
        Examples(L, H).update(bare)
    with pytest.raises(ValueError, match="LayerBatch.seq_idx"):
        PairCollector(L, H, D, D).update(bare)
