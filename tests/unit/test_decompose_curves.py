"""(L0, FVE) curves of the MTC and its baselines, and the head-loading cluster sizes of value
SAEs beside the MTC's (headscope.decompose.sweep, .value_clusters), on hand-set models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from headscope.decompose import capture_layer
from headscope.decompose.mtc import MTC, MTCConfig
from headscope.decompose.sweep import format_sweep, mtc_sweep
from headscope.decompose.value_clusters import compare_loading_clusters, format_loading_clusters
from headscope.errors import InputError
from headscope.files import write_json
from tests.planted import moved_feature_model, planted_adapter, planted_tokens
from tests.tiny_models import VOCAB

# value_loading_model: two layers of four heads (d_head 16). Token t in 3..34 turns on feature
# (t - 3) // 2 (16 features, 4 per group); each feature writes a random direction into the value
# vector of its group's heads, and nothing else reads or writes anything (layer 0's output is
# zero, so layer 1 sees the embeddings too).
GROUP_HEADS = (
    ((0, 0),),  # group 0: L0H0
    ((0, 1), (0, 2)),  # group 1: L0H1 and L0H2
    ((1, 3),),  # group 2: L1H3
    ((0, 3), (1, 0)),  # group 3: L0H3 and L1H0, across layers
)
GROUP_COLUMNS = {0: {0}, 1: {1, 2}, 2: {7}, 3: {3, 4}}  # two-layer columns L0KV0..3, L1KV0..3


def value_loading_model() -> GPT2LMHeadModel:
    d, D = 64, 16
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=d, n_layer=2, n_head=4, n_positions=32, n_inner=8)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        signs = torch.tensor([1.0] * 8 + [-1.0] * 8)
        filler = torch.stack([signs[torch.randperm(16, generator=g)] for _ in range(VOCAB)])
        model.transformer.wte.weight[:, 48:64] = filler
        for t in range(3, 35):
            model.transformer.wte.weight[t, (t - 3) // 2] = 4.0
        for f in range(16):
            for layer, head in GROUP_HEADS[f // 4]:
                u = torch.randn(D, generator=g)
                w = model.transformer.h[layer].attn.c_attn.weight  # [d, 3d]: q | k | v
                w[f, 2 * d + head * D : 2 * d + (head + 1) * D] = u / u.norm()
    return model


def test_sweep_gives_a_curve_per_variant(one_thread):
    adapter = planted_adapter(moved_feature_model())
    train, test = capture_layer(adapter, planted_tokens(80, 24, 40), 0).split(16)
    l1s = (1e-1, 1e-3, 3e-2, 1e-2)  # any order: trained ascending
    sweep = mtc_sweep(train, test, l1s=l1s, n_features=8, k_moved=8, epochs=6, lr=3e-3)
    assert sweep.values == sorted(l1s) and sweep.setting == "l1"
    assert sweep.options == {"n_features": 8, "k_moved": 8, "epochs": 6, "lr": 3e-3}
    for variant in ("mtc", "single_head", "sae_mtc"):
        rows = [r for r in sweep.rows if r.variant == variant]
        assert [r.l1 for r in rows] == sorted(l1s)
        l0 = [r.l0 for r in rows]
        # a larger L1 gives a sparser transcoder: L0 falls as the setting rises
        assert all(a > b for a, b in zip(l0, l0[1:], strict=False)), (variant, l0)
        assert all(-1.0 <= r.fve <= 1.0 for r in rows)
        assert rows[0].fve > rows[-1].fve  # the densest point explains more than the sparsest
    # on the planted model the MTC's FVE rises with L0 all along its curve
    mtc = sorted((r for r in sweep.rows if r.variant == "mtc"), key=lambda r: r.l0)
    assert all(a.fve < b.fve for a, b in zip(mtc, mtc[1:], strict=False)), mtc
    text = format_sweep(sweep)
    assert text.count("single_head") == 4 and "sweep over L1" in text
    with pytest.raises(InputError, match="L1"):
        mtc_sweep(train, test, l1s=())


def test_value_sae_loadings_cluster_by_planted_heads(one_thread):
    adapter = planted_adapter(value_loading_model())
    ids = planted_tokens(96, 24, 35)
    mtc = MTC(MTCConfig(d_model=64, n_heads=4, n_features=16, layer=1))
    c = compare_loading_clusters(
        adapter,
        ids,
        1,
        n_eval=16,
        n_features=16,
        k=1,
        epochs=30,
        ks=(2, 4, 7),
        mtc=mtc,
        batch_size=128,
        lr=1e-2,
    )
    assert [s.source for s in c.sets] == ["mtc", "value_sae", "value_sae"]  # MHA: no OV set
    assert c.sets[0].columns == ["L1H0", "L1H1", "L1H2", "L1H3", "identity"]
    two = c.sets[2]
    assert two.layers == [0, 1] and two.columns[3:5] == ["L0KV3", "L1KV0"]
    assert two.fve is not None and two.fve > 0.9, two
    assert two.n_live >= 14
    by_k = {cl.k: cl for cl in two.clusters}
    assert sorted(by_k) == [2, 4, 7]
    # four planted signatures: k = 4 puts each group's features in one cluster, leaving nothing
    assert by_k[4].inertia < 0.02 * two.n_live, by_k[4]
    assert by_k[2].inertia > 10 * by_k[4].inertia
    text = format_loading_clusters(c)
    assert "value SAE on layer 0 and layer 1" in text and "MTC head loadings" in text


def test_cli_sweep_and_value_clusters(tmp_path, capsys, one_thread):
    import json

    from headscope.cli import main
    from tests.tiny_models import save_tiny, write_texts

    model = save_tiny("llama", tmp_path / "model")  # grouped-query: 4 query heads, 2 value heads
    data = write_texts(tmp_path / "data.jsonl")
    run = tmp_path / "run"
    write_json(run / "manifest.json", {"schema_version": 1})
    dec = run / "decompose"
    common = ["--model", str(model), "--data", str(data), "--layer", "1", "--contexts", "8"]
    common += ["--seq-len", "16", "--eval", "2", "--epochs", "1", "--json"]
    sweep = ["--n-features", "16", "--k-moved", "8", "--variants", "mtc", "sae_mtc"]
    sweep += ["--l1s", "1e-2", "1e-3", "3e-3", "3e-2"]
    assert main(["decompose", "sweep", *common, "--out", str(dec / "sweep"), *sweep]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in result["rows"]] == ["mtc"] * 4 + ["sae_mtc"] * 4
    assert result["values"] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert json.loads((dec / "sweep" / "sweep.json").read_text()) == result

    mtc = ["--n-features", "16", "--k-moved", "8", "--variants", "mtc"]
    assert main(["decompose", "mtc", *common, "--out", str(tmp_path / "m"), *mtc]) == 0
    capsys.readouterr()
    vc = ["--n-features", "16", "--k", "2", "--ks", "2", "4", "--mtc", str(tmp_path / "m" / "mtc")]
    assert main(["decompose", "value-clusters", *common, "--out", str(tmp_path / "v"), *vc]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [s["name"] for s in result["sets"]]
    assert len(names) == 5 and names[0].startswith("MTC")  # MTC; L1 and L0+L1, each KV and OV
    ov = result["sets"][2]
    assert ov["columns"] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    assert (tmp_path / "v" / "value_clusters.json").is_file()
    (tmp_path / "v").rename(dec / "value-L1")

    # the app reads both from the index: no decomposition folder needed
    assert main(["decompose", "pages", str(run), "--model", str(model), "--json"]) == 0
    index = json.loads((run / "decompose" / "index.json").read_text())
    assert index["entries"] == [] and [s["name"] for s in index["sweeps"]] == ["sweep"]
    assert index["clusters"][0]["name"] == "value-L1"
    assert len(index["clusters"][0]["comparison"]["sets"]) == 5
    assert json.loads((run / "manifest.json").read_text())["decompose"] == "decompose/index.json"
