"""The precompute's steps after the stream, made cheaper, give the same outputs as the plain
computations they replace."""

from __future__ import annotations

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
