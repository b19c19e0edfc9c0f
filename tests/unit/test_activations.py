"""Activation streaming for dictionaries equals what a full capture sees."""

from __future__ import annotations

import torch

from headscope.dictionaries.activations import capture_sites, iter_activations
from tests.tiny_models import random_tokens, tiny_adapter, write_texts


def test_sites_match_a_full_capture():
    ad = tiny_adapter("qwen3")
    ids = random_tokens(10, seed=4, batch=2)
    full = ad.run(ids, residuals=True, patterns=False)
    got = capture_sites(ad, ids, [("resid", (1,)), ("z", (1,)), ("v", (0, 1))])
    assert torch.equal(got["resid_L1"], full.resid_pre[1])
    s = ad.spec
    assert torch.allclose(got["z_L1"], full.layers[1].z.reshape(2, 10, s.n_heads * s.d_head))
    v = torch.cat([full.layers[i].v.transpose(1, 2).reshape(2, 10, -1) for i in (0, 1)], -1)
    assert torch.allclose(got["v_L0+L1"], v)


def test_stream_is_bounded_and_skips_bos(tmp_path):
    ad = tiny_adapter("llama")
    data = write_texts(tmp_path / "d.jsonl", n_docs=20)
    rows = list(
        iter_activations(
            ad, data, [("resid", (0,)), ("resid", (2,))], n_tokens=300, seq_len=32, batch_size=2
        )
    )
    assert sum(r["resid_L0"].shape[0] for r in rows) == 300
    assert all(r["resid_L2"].shape == r["resid_L0"].shape for r in rows)
    first = rows[0]["resid_L0"][0]
    assert not torch.allclose(first, ad.embed_matrix()[ad.tokens.bos_id])  # BOS row left out
