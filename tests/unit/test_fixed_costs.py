"""The precompute's steps after the stream, made cheaper, give the same outputs as the plain
computations they replace."""

from __future__ import annotations

import torch

from headscope.model import ModelAdapter
from headscope.precompute import probes
from headscope.precompute.examples import _round2
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
