"""The precompute's steps after the stream, made cheaper, give the same outputs as the plain
computations they replace."""

from __future__ import annotations

import pytest
import torch

from headscope.model import ModelAdapter
from headscope.precompute import probes
from headscope.precompute.payloads import _round2
from tests.tiny_models import save_tiny


def test_rounding_by_table_equals_python_round_for_every_float16():
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every[torch.isfinite(every)]
    got = _round2(finite)
    want = [round(v, 2) for v in finite.float().tolist()]
    assert got == want  # the same floats, hence the same JSON
    assert all(type(v) is float for v in got)


def test_probe_pairs_read_as_layers_run_equal_the_stored_patterns(tmp_path):
    adapter = ModelAdapter.load(str(save_tiny("qwen2", tmp_path / "m")))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (3, 20), generator=gen)
    q = torch.randint(5, 20, (3, 6), generator=gen)
    k = (q - torch.randint(0, 5, (3, 6), generator=gen)).clamp_min(0)
    layers = [0, 2]
    got = probes._edge_attention(adapter, ids, q, k, layers)
    cap = adapter.run(ids, layers=layers, patterns=True, logits=False)
    rows = torch.arange(3)[:, None].expand_as(q)
    for layer in range(adapter.spec.n_layers):
        if layer in layers:
            want = cap.layers[layer].weights()[rows, :, q, k].mean(dim=(0, 1))
            assert torch.equal(got[layer], want)  # bit for bit
        else:
            assert not got[layer].any()


def _long_prefix_curve_uncut(probe: probes.Probe) -> torch.Tensor:
    """The long-prefix curve as first defined: whole 2L-token sequences, one pass per m."""
    adapter, n, length = probe.adapter, probe.n, 2 * probe.length
    gen = torch.Generator().manual_seed(probe.seed + 1)
    curves = []
    for m in probes.PREFIX_LENGTHS:
        ids = probes._random_tokens(adapter, (n, length), gen)
        ids[:, 0] = adapter.tokens.bos_id
        a, b = 3, length // 2 + 2
        ids[:, b : b + m] = ids[:, a : a + m]
        same = ids[:, b - 1] == ids[:, a - 1]
        ids[:, b - 1] = torch.where(same, ids[:, b - 1] + 1, ids[:, b - 1])
        q, k = torch.full((n, 1), b + m - 1), torch.full((n, 1), a + m)
        curves.append(probes._edge_attention(adapter, ids, q, k, probe.layers))
    return torch.stack(curves, -1)


def test_long_prefix_probe_cut_after_its_queries_and_batched_equals_the_whole_sequences(
    tmp_path,
):
    adapter = ModelAdapter.load(str(save_tiny("llama", tmp_path / "m")))
    probe = probes.Probe(adapter, [0, 1, 2], n=5, length=12, seed=3)
    got = probes.long_prefix_curve(probe)
    want = _long_prefix_curve_uncut(probe)
    assert got.shape == want.shape == (3, adapter.spec.n_heads, 4)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert got.abs().sum() > 0


def test_probe_metrics_are_read_back_for_the_same_weights_and_recomputed_for_others(
    tmp_path, monkeypatch
):
    from headscope.precompute import probe_cache

    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    adapter = ModelAdapter.load(str(save_tiny("llama", tmp_path / "m")))

    def probe():
        return probes.Probe(adapter, [0, 1, 2], n=3, length=8, seed=0)

    table, curve = probe_cache.probe_metrics(probe())
    assert set(table) >= {"prefix_matching_score", "long_prefix_score", "copying_score"}
    assert len(list((tmp_path / "cache" / "probes").iterdir())) == 1

    calls = []
    real = probes._edge_attention
    monkeypatch.setattr(probes, "_edge_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, curve_again = probe_cache.probe_metrics(probe())
    assert not calls  # read from the cache: no forward pass
    assert torch.equal(curve_again, curve)
    assert all(torch.equal(again[n], table[n]) for n in table)

    with torch.no_grad():  # other weights: another key, computed afresh
        next(adapter.model.parameters()).mul_(1.5)
    changed, _ = probe_cache.probe_metrics(probe())
    assert calls
    assert len(list((tmp_path / "cache" / "probes").iterdir())) == 2
    assert not torch.equal(changed["copying_score"], table["copying_score"])


def _example_with_torch(payloads, layer, head, seq):
    """ExamplePayloads.example as first written, in torch."""
    k, w, mq, mk = payloads.items[layer][(head, seq)]
    keep = w.float() >= payloads.threshold
    q = torch.arange(k.shape[0])[:, None].expand_as(k)[keep]
    wr = (w.float()[keep].double() * 1000).round() / 1000
    sparse = [[a, b, c] for a, b, c in zip(q.tolist(), k[keep].tolist(), wr.tolist(), strict=True)]
    return {
        "max_as_query": [round(v, 2) for v in mq.float().tolist()],
        "max_as_key": [round(v, 2) for v in mk.float().tolist()],
        "sparse": sparse,
    }


def test_example_payload_in_numpy_equals_the_torch_version():
    from headscope.precompute.payloads import ExamplePayloads

    gen = torch.Generator().manual_seed(0)
    payloads = ExamplePayloads(top_k=2, threshold=0.15)
    T = 64
    w = torch.rand(T, 2, generator=gen).half()
    w[:8] = torch.tensor([0.15, 0.1499, 0.1501, 0.15005, 1.0, 0.0, 0.0005, 0.9995]).half()[:, None]
    k = torch.randint(0, T, (T, 2), generator=gen).short()
    mq, mk = torch.rand(T, generator=gen).half(), torch.rand(T, generator=gen).half()
    payloads.items[3] = {(1, 17): (k, w, mq, mk)}
    got = payloads.example(3, 1, 17)
    assert got == _example_with_torch(payloads, 3, 1, 17)
    assert got["sparse"] and all(type(c) is float for _, _, c in got["sparse"])


def _round_every_float(x):
    """The PCA rounding as first written: every float anywhere, 4 significant digits."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, list):
        return [_round_every_float(v) for v in x]
    if isinstance(x, dict):
        return {k: _round_every_float(v) for k, v in x.items()}
    return x


def test_pca_rounding_of_the_float_fields_equals_rounding_every_float():
    from headscope.precompute.finalize import _round_pca
    from headscope.precompute.pca import PairCollector

    gen = torch.Generator().manual_seed(1)
    L, H, N, D = 2, 3, 5, 4
    pairs = PairCollector(L, H, D, D, n_pairs=N, dtype=torch.float32)
    pairs.norm = torch.rand(L, H, N, generator=gen) * 1e-3
    meta = torch.randint(0, 50, (L, H, N, 5), generator=gen)
    meta[..., 1] = meta[..., 2] + 20  # q_pos after k_pos
    meta[1, 2, 3:] = -1  # empty slots
    pairs.meta = meta
    pairs.window = torch.randint(-1, 100, pairs.window.shape, generator=gen)
    for name in ("q_vec", "k_vec", "o_vec"):
        setattr(pairs, name, torch.randn(L, H, N, D, generator=gen) * 1e-5)
    fit = pairs.fit(n_components=3)
    assert fit[(1, 2)]["points"] and fit[(0, 0)]["q"]["coords"]
    for key, entry in fit.items():
        assert _round_pca(entry) == _round_every_float(entry), key


def test_head_files_encode_as_compact_json_with_non_finite_as_null():
    import json
    import math

    from headscope.precompute.finalize import head_file_bytes

    payload = {
        "head": "L0H1",
        "token": 'é中 "q"',
        "values": [0.15, 1.0, 0.0, -2.5, 123.456, 1e16, None, True, [1, 2, 3]],
        "nested": {"a": [{"b": 0.001}]},
    }
    compact = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert head_file_bytes(payload) == compact.encode("utf-8")
    small = head_file_bytes({"x": [1e-05, 2.5e-07]})
    assert json.loads(small) == {"x": [1e-05, 2.5e-07]}
    assert json.loads(head_file_bytes({"x": [math.nan, math.inf]})) == {"x": [None, None]}


def test_weights_digest_hashes_tied_weights_once_and_sees_every_change():
    from headscope.precompute.probe_cache import _weights_digest

    def model(tied: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.embed = torch.nn.Embedding(10, 4)
        m.unembed = torch.nn.Linear(4, 10, bias=False)
        if tied:
            m.unembed.weight = m.embed.weight
        else:
            m.unembed.weight.data.copy_(m.embed.weight.data)
        return m

    tied, untied = model(True), model(False)
    assert _weights_digest(tied) == _weights_digest(model(True))
    assert _weights_digest(tied) != _weights_digest(untied)  # the same numbers, not shared
    before = _weights_digest(tied)
    with torch.no_grad():
        tied.unembed.weight[3, 1] += 1.0
    assert _weights_digest(tied) != before
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(NotImplementedError):
        _weights_digest(meta)
