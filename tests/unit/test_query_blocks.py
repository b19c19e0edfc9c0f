"""Long contexts: a layer's patterns computed in blocks of query rows give the results of the
whole ``T x T`` computation (attention internals, every accumulator, a whole precompute), at
block sizes that divide the sequence and that do not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headscope.model import ModelAdapter
from headscope.model.capture import Workspace, blocked_attention, eager_attention
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.motifs import MOTIF_FEATURE_NAMES
from headscope.precompute.runner import process_batch, query_block_for
from headscope.precompute.sequences import Sequence, iter_sequences
from headscope.precompute.state import StreamState
from tests.tiny_models import build_tiny_run, save_tiny, write_texts

TOL = 1e-5
STD = [i for i, name in enumerate(MOTIF_FEATURE_NAMES) if name.endswith("_std")]
STD += [i for i, name in enumerate(MOTIF_FEATURE_NAMES) if name.endswith(".std")]


def _attention_inputs(kind: str, T: int = 37):
    gen = torch.Generator().manual_seed(1)
    B, H, KV, D = 2, 4, 2, 8
    q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, KV, T, D, generator=gen)
    v = torch.randn(B, KV, T, D, generator=gen)
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    mask, window, softcap = None, None, None
    if kind == "bool":
        keep = keep[None, None].repeat(B, 1, 1, 1)
        keep[1, :, :, T - 5 :] = False  # the second sequence ends in 5 padding keys
        keep[1, :, T - 5 :, 0] = True
        mask = keep
    elif kind == "additive":
        mask = torch.zeros(B, 1, T, T).masked_fill_(~keep, float("-inf"))
    elif kind == "window":
        window = 5
    elif kind == "softcap":
        softcap = 2.0
    return q, k, v, mask, window, softcap


@pytest.mark.parametrize("kind", ["causal", "bool", "additive", "window", "softcap"])
@pytest.mark.parametrize("block", [1, 8, 10, 36])
def test_blocked_attention_equals_the_whole_pattern(kind, block):
    q, k, v, mask, window, softcap = _attention_inputs(kind)
    scores, pattern, out = eager_attention(q, k, v, mask, 0.3, softcap, window)
    T = q.shape[2]
    seen: list[int] = []

    def emit(start, s_block, p_block, z):
        r, S = p_block.shape[2], p_block.shape[3]
        assert start + r == S  # a block's rows see the keys up to its last row
        assert torch.allclose(p_block, pattern[:, :, start : start + r, :S], atol=1e-6)
        assert torch.equal(s_block.isinf(), scores[:, :, start : start + r, :S].isinf())
        # keys after the block are masked for its rows: nothing of the pattern is missing
        if S < T:
            assert pattern[:, :, start : start + r, S:].abs().max() == 0
        assert torch.allclose(z[:, : start + r], out[:, : start + r], atol=1e-6)
        seen.append(start)

    z = blocked_attention(q, k, v, mask, 0.3, softcap, window, Workspace(), block, emit)
    assert seen == list(range(0, T, block))
    assert torch.allclose(z, out, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    return save_tiny("llama", root / "model"), write_texts(root / "data.jsonl", n_docs=60)


def _states(model, data, blocks, *, seq_len=96, n=6, layers=None, whole=True):
    """StreamStates of the same batches, whole layers (key None, unless ``whole`` is False)
    and each block size; the last sequence is cut short so its batch holds padding."""
    torch.manual_seed(0)
    adapter = ModelAdapter.load(str(model))
    cfg = PrecomputeConfig(
        model=str(model), seq_len=seq_len, batch_size=4, motif_sequences=5, pca_pairs=24
    )
    seqs = list(iter_sequences(adapter.tokens, data, seq_len, limit=n))
    last = seqs[-1]
    seqs[-1] = Sequence(last.index, last.ids[:-11], last.doc_starts[:-11], last.continued, ())
    layers = layers or list(range(adapter.spec.n_layers))
    out = {}
    for block in ((None,) if whole else ()) + tuple(blocks):
        state = StreamState(adapter.spec, cfg)
        for i in range(0, n, 4):
            process_batch(adapter, state, layers, seqs[i : i + 4], block)
        out[block] = state
    return out


def _examples(state):
    ex = state.examples
    out = {}
    for (layer, head), buckets in ex.selector.selected().items():
        for _, _, items in buckets:
            for seq, score in items:
                out[(layer, head, seq)] = (score, ex.payloads.example(layer, head, seq))
    return out


def test_blocked_stream_equals_whole_layers(tiny):
    model, data = tiny
    states = _states(model, data, blocks=(7, 32, 50, 95))
    whole = states.pop(None)
    want_metrics = whole.metrics.result()
    want_examples = _examples(whole)
    want_top = whole.top_tokens.top_tokens(min_count=2, k=10)
    want_pairs = whole.pairs.state_dict()
    want_motifs = whole.motifs.state_dict()
    for block, state in states.items():
        for name, value in state.metrics.result().items():
            assert torch.allclose(value, want_metrics[name], atol=TOL, equal_nan=True), (
                block,
                name,
            )
        got = _examples(state)
        assert got.keys() == want_examples.keys(), block
        for key, (score, example) in got.items():
            want_score, want_example = want_examples[key]
            assert math.isclose(score, want_score, abs_tol=TOL)
            for field in ("max_as_query", "max_as_key"):
                assert example[field] == pytest.approx(want_example[field], abs=1e-2)
            assert [p[:2] for p in example["sparse"]] == [p[:2] for p in want_example["sparse"]]
            assert [p[2] for p in example["sparse"]] == pytest.approx(
                [p[2] for p in want_example["sparse"]], abs=2e-3
            )
        top = state.top_tokens.top_tokens(min_count=2, k=10)
        for head, sides in want_top.items():
            for side, rows in sides.items():
                assert [r[0] for r in top[head][side]] == [r[0] for r in rows], (block, head)
                assert [r[2] for r in top[head][side]] == [r[2] for r in rows]
                assert [r[1] for r in top[head][side]] == pytest.approx(
                    [r[1] for r in rows], abs=TOL
                )
        pairs = state.pairs.state_dict()
        assert torch.equal(pairs["meta"], want_pairs["meta"]), block
        assert torch.allclose(pairs["norm"], want_pairs["norm"], atol=TOL, equal_nan=True)
        motifs = state.motifs.state_dict()
        assert torch.equal(motifs["filled"], want_motifs["filled"])
        # a standard deviation near 0 is the square root of float32 cancellation noise (1 ulp
        # of a pattern moves it by ~1e-4): those features are compared as variances
        got_f, want_f = motifs["features"].double(), want_motifs["features"].double()
        got_f[..., STD], want_f[..., STD] = got_f[..., STD].square(), want_f[..., STD].square()
        assert torch.allclose(got_f, want_f, atol=TOL)


def test_a_block_no_shorter_than_the_sequence_is_the_whole_computation(tiny):
    model, data = tiny
    states = _states(model, data, blocks=(96, 500), n=4, layers=[1])
    whole = states.pop(None)
    for state in states.values():  # bit for bit: the same code path
        for name, value in state.state_dict().items():
            assert torch.equal(value, whole.state_dict()[name]), name


def test_blocked_precompute_writes_the_same_run(tmp_path, tiny):
    model, data = tiny
    settings = dict(seq_len=96, sequences=5, motif_sequences=3, pca_pairs=16)
    whole = build_tiny_run(tmp_path, model=model, data=data, name="whole", **settings)
    blocked = build_tiny_run(
        tmp_path, model=model, data=data, name="blocked", query_block=20, **settings
    )
    want = json.loads((whole / "metrics.json").read_text())
    got = json.loads((blocked / "metrics.json").read_text())
    assert got["columns"] == want["columns"]
    assert torch.allclose(
        torch.tensor([r[2:] for r in got["rows"]], dtype=torch.float64),
        torch.tensor([r[2:] for r in want["rows"]], dtype=torch.float64),
        atol=TOL,
    )
    for path in sorted((whole / "heads").glob("*.json")):
        a = json.loads(path.read_text())
        b = json.loads((blocked / "heads" / path.name).read_text())
        assert [e["sequence"] for e in a["examples"]] == [e["sequence"] for e in b["examples"]]
        assert [e["tokens"] for e in a["examples"]] == [e["tokens"] for e in b["examples"]]
        assert [t["id"] for t in a["top_key_tokens"]] == [t["id"] for t in b["top_key_tokens"]]
        assert [p["sequence"] for p in a["pca"]["points"]] == [
            p["sequence"] for p in b["pca"]["points"]
        ]


def test_the_block_size_follows_the_memory_budget():
    assert query_block_for(4, 9, 512) is None  # 38 MB of patterns: whole layers
    rows = query_block_for(1, 9, 8192)
    assert rows is not None and rows % 32 == 0 and rows < 8192
    assert 1 * 9 * rows * 8192 * 4 <= 256 << 20
    assert query_block_for(1, 9, 1 << 20) == 32  # never fewer than 32 rows


def test_a_blocked_stream_never_holds_a_whole_pattern(tiny, monkeypatch):
    """Every pattern-sized buffer of a blocked stream (the capture's scores, pattern and
    weights, the pair search's scratch) holds at most ``B x H x block x T`` values."""
    from headscope.model import capture

    sizes: list[int] = []
    real_flat, real_get = capture.Workspace.flat, capture.Workspace.get

    def flat(self, name, shape, dtype, device, capacity):
        out = real_flat(self, name, shape, dtype, device, capacity)
        sizes.append(self._buffers[name].numel())
        return out

    def get(self, name, shape, dtype, device):
        sizes.append(math.prod(shape))
        return real_get(self, name, shape, dtype, device)

    monkeypatch.setattr(capture.Workspace, "flat", flat)
    monkeypatch.setattr(capture.Workspace, "get", get)
    model, data = tiny
    B, T = 4, 96
    whole = _states(model, data, blocks=(), n=4)[None]
    H = whole.metrics.n_heads
    assert max(sizes) == B * H * T * T  # whole layers: [B, H, T, T] buffers
    sizes.clear()
    blocked = _states(model, data, blocks=(16,), n=4, whole=False)[16]
    assert sizes and max(sizes) <= B * H * 16 * T
    assert blocked.pairs._buffer is not None
    assert blocked.pairs._buffer.numel() <= B * H * 16 * T


def test_a_run_made_before_query_blocks_existed_is_still_recognised(tmp_path):
    from headscope.files import write_json
    from headscope.precompute.runner import _check_existing

    cfg = PrecomputeConfig(model="m", seq_len=64)
    old = {k: v for k, v in cfg.to_dict().items() if k != "query_block"}
    write_json(tmp_path / "manifest.json", {"status": "complete", "config": old})
    assert _check_existing(tmp_path, cfg)  # the new setting at its default: the same run
    with pytest.raises(FileExistsError, match="different configuration"):
        _check_existing(tmp_path, PrecomputeConfig(model="m", seq_len=64, query_block=32))
