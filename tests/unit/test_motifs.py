"""Pattern-motif features, the reusable embedder, head distances and head maps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from headscope.precompute.motifs import (
    EMBED_DIM,
    MOTIF_FEATURE_NAMES,
    MotifEmbedder,
    head_distances,
    head_map,
    motif_features,
    nearest_heads,
)

F = len(MOTIF_FEATURE_NAMES)


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    T = logits.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def head_patterns(kind: str, S: int, T: int, seed: int) -> torch.Tensor:
    """[S, T, T] noisy patterns of one kind of head on S sequences."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(S, T, T, generator=g)
    pos = torch.arange(T)
    logits = noise.clone()
    if kind == "prev":
        logits[:, pos[1:], pos[:-1]] += 8.0
    elif kind == "bos":
        logits[:, :, 0] += 8.0
    elif kind == "self":
        logits[:, pos, pos] += 8.0
    elif kind == "uniform":
        logits = noise * 0.1
    return causal_softmax(logits)


def value(features: torch.Tensor, name: str) -> torch.Tensor:
    return features[..., MOTIF_FEATURE_NAMES.index(name)]


def test_feature_names_are_unique_and_match_width():
    assert len(set(MOTIF_FEATURE_NAMES)) == F
    feats = motif_features(
        head_patterns("prev", 2, 20, 0)[:, None], torch.ones(2, 20, dtype=torch.bool)
    )
    assert feats.shape == (2, 1, F)


def test_features_are_finite_for_any_input():
    pats = torch.stack(
        [head_patterns(k, 3, 150, i) for i, k in enumerate(["prev", "bos", "self", "uniform"])], 1
    )
    valid = torch.ones(3, 150, dtype=torch.bool)
    valid[1, 40:] = False
    valid[2, 1:] = False  # a single valid token: every statistic is empty
    pats[1, :, 40:] = float("nan")  # padding rows may hold anything
    feats = motif_features(pats, valid)
    assert feats.shape == (3, 4, F)
    assert torch.isfinite(feats).all()
    assert (feats[2] == 0).all()
    for T in (1, 2, 5, 16):  # shorter than the distance profile, or than the sub-diagonals
        short = motif_features(pats[:, :, :T, :T].contiguous(), valid[:, :T])
        assert short.shape == (3, 4, F) and torch.isfinite(short).all()


def test_known_feature_values():
    T = 40
    prev = torch.zeros(T, T)
    prev[0, 0] = 1.0
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    bos = torch.zeros(T, T)
    bos[:, 0] = 1.0
    feats = motif_features(torch.stack([prev, bos])[None], torch.ones(1, T, dtype=torch.bool))[0]
    assert value(feats[0], "sub1.mean") == pytest.approx(1.0)
    assert value(feats[0], "diag.max") == pytest.approx(0.0)
    assert value(feats[0], "entropy.mean") == pytest.approx(0.0, abs=1e-6)
    assert value(feats[0], "gram_skew.cos_mean") == pytest.approx(1.0, abs=1e-5)
    assert value(feats[0], "tail.rel_distance") == pytest.approx(
        torch.tensor([1 / q for q in range(1, T)]).mean().item(), rel=1e-5
    )
    assert value(feats[1], "first_col.mean") == pytest.approx(1.0)
    assert value(feats[1], "row_max.max") == pytest.approx(0.0)
    assert value(feats[1], "gram_rows.cos_mean") == pytest.approx(1.0, abs=1e-5)  # one vertical bar
    assert value(feats[1], "tail.rel_distance") == pytest.approx(1.0)


def test_block_is_the_prefix_pattern():
    """Features only see the first 128 tokens: extending the sequence changes nothing."""
    long = head_patterns("prev", 1, 200, 3)[:, None]
    a = motif_features(long, torch.ones(1, 200, dtype=torch.bool))
    b = motif_features(long[:, :, :128, :128], torch.ones(1, 128, dtype=torch.bool))
    torch.testing.assert_close(a, b)


def _heads_features(S: int = 12, T: int = 48):
    kinds = ["prev", "prev", "bos", "self", "uniform", "bos"]
    pats = torch.stack([head_patterns(k, S, T, seed=10 + i) for i, k in enumerate(kinds)], 1)
    feats = motif_features(pats, torch.ones(S, T, dtype=torch.bool))  # [S, heads, F]
    return kinds, feats.transpose(0, 1)  # [heads, S, F]


def test_similar_heads_are_nearest_and_different_heads_far():
    kinds, feats = _heads_features()
    emb = MotifEmbedder.fit(feats.reshape(-1, F)).embed(feats)  # [heads, S, 16]
    assert emb.shape == (len(kinds), 12, EMBED_DIM)
    dist = head_distances(emb)
    assert torch.equal(dist, dist.T) and (dist.diagonal() == 0).all()
    idx, d = nearest_heads(dist, 2)
    assert idx[0, 0] == 1 and idx[1, 0] == 0  # the two prev-token heads
    assert idx[2, 0] == 5 and idx[5, 0] == 2  # the two BOS heads
    assert dist[0, 1] * 3 < dist[0, 2]  # prev vs prev << prev vs bos
    assert (d[:, 0] <= d[:, 1]).all()


def test_head_distances_is_mean_per_sequence_distance():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 5, EMBED_DIM, generator=g)
    want = torch.stack(
        [(emb[i] - emb[j]).norm(dim=-1).mean() for i in range(4) for j in range(4)]
    ).view(4, 4)
    torch.testing.assert_close(head_distances(emb, chunk=2).float(), want, rtol=1e-5, atol=1e-6)


def test_embedder_save_load_round_trip(tmp_path):
    _, feats = _heads_features()
    flat = feats.reshape(-1, F)
    emb = MotifEmbedder.fit(flat)
    path = tmp_path / "pca.safetensors"
    emb.save(path)
    back = MotifEmbedder.load(path)
    assert torch.equal(back.embed(flat), emb.embed(flat))
    ratio = back.explained_variance_ratio
    assert (ratio[:-1] >= ratio[1:]).all() and 0.5 < ratio.sum() <= 1 + 1e-9
    # components are sign-fixed: the largest |loading| of each is positive
    comps = back.components
    assert (comps.gather(1, comps.abs().argmax(1, keepdim=True)) > 0).all()


def test_embedder_refuses_other_feature_sets(tmp_path):
    _, feats = _heads_features(S=4)
    path = tmp_path / "pca.safetensors"
    MotifEmbedder.fit(feats.reshape(-1, F)).save(path)
    tensors = load_file(path)
    names = list(MOTIF_FEATURE_NAMES)
    names[0] = "something.else"
    save_file(
        tensors,
        tmp_path / "other.safetensors",
        metadata={
            "format": "headscope.motif-embedder/1",
            "block": "128",
            "feature_names": json.dumps(names),
        },
    )
    with pytest.raises(ValueError, match="different motif feature set"):
        MotifEmbedder.load(tmp_path / "other.safetensors")
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a motif embedder"):
        MotifEmbedder.load(tmp_path / "plain.safetensors")


def test_head_map_is_deterministic():
    _, feats = _heads_features()
    emb = MotifEmbedder.fit(feats.reshape(-1, F)).embed(feats)
    dist = head_distances(emb)
    a, b = head_map(dist, n_neighbors=3), head_map(dist, n_neighbors=3)
    assert a == b
    for name in ("isomap", "tsne"):
        assert len(a[name]) == 6 and all(len(p) == 2 for p in a[name])
    assert head_map(dist[:2, :2]) == {"isomap": [[0.0, 0.0]] * 2, "tsne": [[0.0, 0.0]] * 2}


def test_trailing_padding_changes_nothing():
    """A padded position at the end (the where() path) gives the unpadded features."""
    pats = head_patterns("uniform", 2, 60, 4)[:, None]
    padded = pats.clone()
    padded[:, :, 59] = float("nan")
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[:, 59] = False
    a = motif_features(padded, valid)
    b = motif_features(pats[:, :, :59, :59].contiguous(), torch.ones(2, 59, dtype=torch.bool))
    torch.testing.assert_close(a, b)
