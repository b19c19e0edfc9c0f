"""Attention decompositions (headscope.decompose) on hand-set one-layer models (tests/planted.py):
an MTC finds a feature moved by one head, QK diagonalisation finds two planted query-key
matches, head splitting separates a head built from two disjoint heads; every saved folder
loads back bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

from headscope.decompose import (
    DecomposeFormatError,
    capture_layer,
    compare_mtcs,
    evaluate_mtc,
    format_comparison,
    format_qk_features,
    format_qk_table,
    format_split,
    load_layer_data,
    load_mtc,
    load_qk,
    load_split,
    qk_report,
    save_layer_data,
    save_mtc,
    save_qk,
    save_split,
    shares,
    split_sweep,
    train_mtc,
    train_qk,
    train_split,
)
from tests.planted import (
    KA,
    KB,
    MOVED_OUT,
    OTHER_OUT,
    QA,
    QB,
    X_OUT,
    XQ,
    Y_OUT,
    YQ,
    moved_feature_model,
    planted_adapter,
    planted_tokens,
    two_head_sum_model,
    two_match_model,
)


@pytest.fixture(scope="module")
def moved():
    adapter = planted_adapter(moved_feature_model())
    return adapter, capture_layer(adapter, planted_tokens(80, 24, 40), 0).split(16)


@pytest.fixture(scope="module")
def matches():
    adapter = planted_adapter(two_match_model())
    return adapter, capture_layer(adapter, planted_tokens(96, 24, 60), 0).split(16)


@pytest.fixture(scope="module")
def summed():
    adapter = planted_adapter(two_head_sum_model())
    return adapter, capture_layer(adapter, planted_tokens(96, 24, 60), 0).split(16)


def _in(ids: torch.Tensor, tokens: range) -> torch.Tensor:
    return torch.isin(ids, torch.tensor(list(tokens)))


def test_capture_matches_the_model(moved, one_thread):
    adapter, (train, _) = moved
    assert train.pattern.shape == (64, 2, 24, 24) and train.resid_post is None
    assert torch.allclose(train.pattern.sum(-1), torch.ones(64, 2, 24))
    # L0H0 is a previous-token head
    assert (train.pattern[:, 0, 2:].argmax(-1) == torch.arange(1, 23)).all()
    # the attention output is the model's: z through W_O plus b_O
    cap = adapter.run(train.ids[:2], layers=[0], residuals=True, logits=False)
    assert torch.allclose(train.attn_out[:2], cap.attn_out[0], atol=1e-5)


def test_mtc_recovers_a_feature_moved_by_one_head(moved, one_thread):
    _, (train, test) = moved
    mtc, stats = train_mtc(train, test, n_features=8, k_moved=8, epochs=40, lr=3e-3)
    assert stats.fve > 0.9, stats
    loads = mtc.head_loadings()  # [F, 3]: L0H0, L0H1, identity
    dec = mtc.W_dec.detach()
    f = int(dec[:, MOVED_OUT].abs().argmax())
    assert dec[f, MOVED_OUT].abs() > 0.95  # the decoder writes the moved feature's direction
    assert loads[f, 0] > 0.7, loads[f]  # ... moved by L0H0, the previous-token head
    g = int(dec[:, OTHER_OUT].abs().argmax())
    assert loads[g].argmax() == 1, loads[g]  # the other feature by L0H1


def test_mtc_baselines_and_comparison(moved, one_thread):
    _, (train, test) = moved
    comparison, trained = compare_mtcs(
        train, test, cluster_ks=(2, 4), n_features=8, k_moved=8, epochs=4, lr=3e-3
    )
    assert [r.variant for r in comparison.rows] == ["mtc", "single_head", "sae_mtc"]
    assert comparison.columns == ["L0H0", "L0H1", "identity"]
    single = trained["single_head"].head_loadings()
    assert torch.equal(single.max(-1).values, torch.ones(8))  # one pattern per feature
    assert comparison.rows[2].sae_fve is not None
    assert [c.k for c in comparison.clusters] == [2, 4]
    assert sum(comparison.clusters[0].sizes) == sum(comparison.dominant)
    assert "single_head" in format_comparison(comparison)


def test_qk_diagonalisation_recovers_two_matches(matches, one_thread):
    adapter, (train, test) = matches
    model, stats = train_qk(train, test, 0, n_features=6, l1=1e-3, epochs=30, lr=1e-2)
    assert stats.kl < 0.05 * stats.uniform_kl, stats
    assert stats.pattern_fve > 0.95
    report = qk_report(model, test, stats, tokens=adapter.tokens, n_features=2)
    found = set()
    for feat in report.features:
        q_ids = {t.id for t in feat.query_tokens}
        k_ids = {t.id for t in feat.key_tokens}
        pair_q = {int(test.ids[p.context, p.query]) for p in feat.pairs}
        pair_k = {int(test.ids[p.context, p.key]) for p in feat.pairs}
        for name, qs, ks in (("A", QA, KA), ("B", QB, KB)):
            if q_ids <= set(qs) and k_ids <= set(ks) and pair_q <= set(qs) and pair_k <= set(ks):
                found.add(name)
    assert found == {"A", "B"}, format_qk_features(report)
    assert sum(f.share for f in report.features) > 0.95


def test_qk_variants_run(matches, one_thread):
    _, (train, test) = matches
    rows = [
        train_qk(train, test, 0, n_features=4, rank=2, epochs=2)[1],
        train_qk(train, test, 0, n_features=4, variant="linear", epochs=2)[1],
    ]
    for r in rows:
        assert 0 <= r.top1 <= 1 and r.kl >= 0 and r.l0_pair <= min(r.l0_query, r.l0_key) + 4
    assert "linear" in format_qk_table("L0H0", rows)


def test_head_split_recovers_two_disjoint_heads(summed, one_thread):
    adapter, (train, test) = summed
    split, stats = train_split(adapter, train, test, [0], 2, epochs=40, lr=1e-2)
    assert stats.fve >= 0.99, stats
    share = shares(split, test)  # [N, T, 2]
    x, y = share[_in(test.ids, XQ)].mean(0), share[_in(test.ids, YQ)].mean(0)
    a, b = int(x.argmax()), int(y.argmax())
    assert a != b and x[a] > 0.85 and y[b] > 0.85, (x, y)
    W_O = split.W_O.detach()  # [k, D, d]: each sub-head writes its own subspace
    mass = lambda i, out: W_O[i][:, out.start : out.stop].norm()  # noqa: E731
    assert mass(a, X_OUT) > 3 * mass(a, Y_OUT) and mass(b, Y_OUT) > 3 * mass(b, X_OUT)


def test_split_sweep_reports_every_k(summed, one_thread):
    adapter, (train, test) = summed
    report, splits = split_sweep(adapter, train, test, [0], (1, 2), epochs=2)
    assert [r.k for r in report.rows] == [1, 2] and len(report.examples) == 2
    assert report.heads == ["L0H0"] and len(splits) == 2
    assert "sub-head 1" in format_split(report)


def test_round_trips_are_bit_identical(moved, matches, summed, tmp_path, one_thread):
    _, (train, test) = moved
    mtc, stats = train_mtc(train, test, n_features=8, variant="sae_mtc", epochs=1)
    save_mtc(mtc, tmp_path / "mtc", stats.model_dump())
    back = load_mtc(tmp_path / "mtc")
    assert back.cfg == mtc.cfg
    for name, t in mtc.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert torch.equal(back(test.resid, test.pattern), mtc(test.resid, test.pattern))
    assert evaluate_mtc(back, test).fve == evaluate_mtc(mtc, test).fve
    assert json.loads((tmp_path / "mtc" / "stats.json").read_text())["variant"] == "sae_mtc"

    _, (train, test) = matches
    qk, _ = train_qk(train, test, 0, n_features=4, rank=2, epochs=1)
    save_qk(qk, tmp_path / "qk")
    qk_back = load_qk(tmp_path / "qk")
    assert qk_back.cfg == qk.cfg
    for name, t in qk.state_dict().items():
        assert torch.equal(qk_back.state_dict()[name], t), name
    keep = torch.ones(24, 24, dtype=torch.bool).tril()
    q, k = test.q[:, 0], test.k[:, 0]
    assert torch.equal(qk_back(q, k, keep), qk(q, k, keep))

    adapter, (train, test) = summed
    split, _ = train_split(adapter, train, test, [0], 2, d_head=32, epochs=1)
    save_split(split, tmp_path / "split")
    split_back = load_split(tmp_path / "split")
    assert split_back.cfg == split.cfg and split.cfg.d_head == 32
    for name, t in split.state_dict().items():
        assert torch.equal(split_back.state_dict()[name], t), name
    assert torch.equal(split_back(test.resid), split(test.resid))

    save_layer_data(test, tmp_path / "data")
    data_back = load_layer_data(tmp_path / "data")
    assert torch.equal(data_back.pattern, test.pattern) and torch.equal(data_back.ids, test.ids)


def test_loading_the_wrong_folder_says_why(moved, tmp_path, one_thread):
    _, (train, test) = moved
    mtc, _ = train_mtc(train, test, n_features=4, epochs=1)
    save_mtc(mtc, tmp_path / "mtc")
    with pytest.raises(DecomposeFormatError, match="kind 'mtc', expected 'qk'"):
        load_qk(tmp_path / "mtc")
    cfg = json.loads((tmp_path / "mtc" / "cfg.json").read_text())
    cfg["n_features"] = 5
    (tmp_path / "mtc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DecomposeFormatError, match="W_enc has shape"):
        load_mtc(tmp_path / "mtc")
    with pytest.raises(DecomposeFormatError, match="has no cfg.json"):
        load_split(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2", "gpt_neox"])
def test_one_noiseless_sub_head_is_the_head(arch, one_thread):
    """k = 1 with no noise reproduces the head exactly: the split's own attention (norm, RoPE,
    biases, scale, soft-cap, window) is the model's."""
    from headscope.decompose import evaluate_split, head_target, init_split
    from tests.tiny_models import random_tokens, tiny_adapter

    adapter = tiny_adapter(arch)
    data = capture_layer(adapter, random_tokens(12, batch=3), 1)
    for head in (0, 3):
        split = init_split(adapter, 1, [head], 1, noise=0.0)
        stats = evaluate_split(split, data, head_target(adapter, data, [head]))
        assert stats.fve > 1 - 1e-5, (arch, head, stats.fve)


def test_qk_norm_models_cannot_be_split_yet(one_thread):
    from headscope.decompose import init_split
    from headscope.errors import InputError
    from tests.tiny_models import tiny_adapter

    with pytest.raises(InputError, match="QK-norm"):
        init_split(tiny_adapter("qwen3"), 1, [0], 2)


def test_cli_decompose_commands(tmp_path, capsys, one_thread):
    from headscope.cli import main
    from tests.tiny_models import save_tiny, write_texts

    model = save_tiny("llama", tmp_path / "model")
    data = write_texts(tmp_path / "data.jsonl")
    common = ["--model", str(model), "--data", str(data), "--layer", "1", "--contexts", "8"]
    common += ["--seq-len", "16", "--eval", "2", "--epochs", "1", "--json"]
    runs = {
        "mtc": ["--n-features", "16", "--k-moved", "8", "--variants", "mtc", "single_head"],
        "qk": ["--head", "1", "--n-features", "4", "--rank", "2"],
        "split": ["--head", "2", "--k", "2", "--d-head", "4"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["decompose", name, *common, "--out", str(out), *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        if name == "mtc":
            assert [r["variant"] for r in result["rows"]] == ["mtc", "single_head"]
            assert load_mtc(out / "single_head").cfg.variant == "single_head"
        elif name == "qk":
            assert result["head"] == "L1H1" and load_qk(out).cfg.rank == 2
        else:
            assert result["rows"][0]["k"] == 2 and load_split(out).cfg.d_head == 4
            assert (out / "report.json").is_file()
