"""Heads through z dictionaries: the mono/mostly/bi/poly classes on planted heads, the explained
fractions and DFA shares on a tiny model, and the columns and panels written into a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headscope.dictionaries.activations import iter_activations
from headscope.dictionaries.reports import semantic_class, z_head_report
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.dictionaries.z_heads import add_to_run, format_text, z_folders, z_heads
from headscope.errors import InputError
from tests.tiny_models import build_tiny_run, tiny_adapter, write_texts


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([10], 1),
        ([9, 1], 2),
        ([8, 1, 1], 2),
        ([8, 2], 2),  # two exceptions: still mostly monosemantic (it wins over bisemantic)
        ([7, 3], 3),
        ([5, 5], 3),
        ([7, 2, 1], 4),
        ([4, 3, 3], 4),
        ([1] * 10, 4),
        ([4, 1], 2),  # fewer than 10 features: one exception in 5 is allowed
        ([1, 1], 3),
        ([3], 1),
        ([], None),
    ],
)
def test_class_thresholds(sizes, expected) -> None:
    assert semantic_class(sizes) == expected


H, D = 4, 16
# Head h's features: groups of features along one direction each.
PLANTED = {0: [10], 1: [8, 1, 1], 2: [5, 5], 3: [1] * 10}
EXPECTED = ["monosemantic", "mostly monosemantic", "bisemantic", "polysemantic"]


def planted_sae(folder: Path) -> Path:
    """A z SAE whose features each write one head only; head h's 10 features point along as many
    orthogonal directions as PLANTED[h] has groups (features of a group differ by small noise)."""
    g = torch.Generator().manual_seed(0)
    F = 10 * H + 560  # and 560 features that no head writes (a realistic count for the cards)
    cfg = SAEConfig(d_in=H * D, d_sae=F, k=4, site="z", layers=(3,), extra={"n_heads": H})
    sae = SAE(cfg, generator=g)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]  # orthonormal columns
    with torch.no_grad():
        sae.W_dec.zero_()
        for h, sizes in PLANTED.items():
            f = 10 * h
            for gi, n in enumerate(sizes):
                for _ in range(n):
                    noise = 0.15 * torch.randn(D, generator=g)
                    sae.W_dec[f, h * D : (h + 1) * D] = basis[:, gi] + noise
                    f += 1
    return save_sae(sae, folder)


def test_planted_heads_get_their_class(tmp_path) -> None:
    folder = planted_sae(tmp_path / "z_L3")
    report = z_head_report(folder)
    assert [r["class"] for r in report["heads"]] == EXPECTED
    assert [r["class_index"] for r in report["heads"]] == [1, 2, 3, 4]
    assert [r["group_sizes"] for r in report["heads"]] == [[10], [8, 1, 1], [5, 5], [1] * 10]
    assert report["tally"] == {c: 1 for c in EXPECTED}
    for h, row in enumerate(report["heads"]):
        # the head's own 10 features, each written by it alone
        assert sorted(t["feature"] for t in row["top_by_share"]) == list(range(10 * h, 10 * h + 10))
        assert all(t["share"] == pytest.approx(1.0) for t in row["top_by_share"])
    assert "| L3H2 | bisemantic |" in (folder / "head_report.md").read_text()

    # The same result without the model: no explained fractions.
    result = z_heads(z_folders(tmp_path))
    assert [h.semantic_class for h in result.heads] == EXPECTED
    assert result.n_tokens == 0 and all(h.explained is None for h in result.heads)
    assert "4 heads: 1 monosemantic, 1 mostly monosemantic, 1 bisemantic, 1 polysemantic" in (
        format_text(result)
    )


def test_shared_tokens_relate_features(tmp_path) -> None:
    """The polysemantic head's 10 orthogonal features become one group when their cards share a
    promoted token; frequent-token cards of unrelated heads are untouched."""
    folder = planted_sae(tmp_path / "z_L3")
    cards = {
        str(f): {
            "density": 0.1,
            "top_contexts": [f"a⟦t{f}⟧b"],
            "top_acts": [1.0],
            "promoted": [" same"] if 30 <= f < 40 else [f" p{f}"],
        }
        for f in range(10 * H + 560)
    }
    (folder / "features.json").write_text(json.dumps(cards))
    report = z_head_report(folder)
    assert [r["class"] for r in report["heads"]] == [*EXPECTED[:3], "monosemantic"]
    assert report["heads"][3]["top_by_share"][0]["context"] == "a⟦t30⟧b"
    # a token in the cards of over 2% of the layer's features relates nothing
    for f in range(40, 70):
        cards[str(f)]["promoted"] = [" same"]
    (folder / "features.json").write_text(json.dumps(cards))
    assert z_head_report(folder)["heads"][3]["class"] == "polysemantic"


def exact_sae(folder: Path, layer: int, n_heads: int, d_head: int) -> Path:
    """A z SAE that reconstructs z exactly: features ±e_j (2·H·D of them, all active)."""
    d = n_heads * d_head
    cfg = SAEConfig(
        d_in=d, d_sae=2 * d, k=2 * d, site="z", layers=(layer,), extra={"n_heads": n_heads}
    )
    sae = SAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d, 2d]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [2d, d]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return save_sae(sae, folder)


def test_explained_fractions_and_dfa_on_a_tiny_model(tmp_path) -> None:
    adapter = tiny_adapter("llama")
    s = adapter.spec
    H, D = s.n_heads, s.d_head
    data = write_texts(tmp_path / "texts.jsonl", n_docs=30)
    folder = exact_sae(tmp_path / "saes" / "z_L1", 1, H, D)
    result = z_heads([folder], adapter, data=data, n_tokens=500, seq_len=32, skip_sequences=0)
    assert result.n_tokens == 500 and result.data == str(data)
    # the same tokens, in one batch, reconstructed by hand
    rows = next(
        iter_activations(adapter, data, [("z", (1,))], n_tokens=500, seq_len=32, batch_size=64)
    )
    z = rows["z_L1"].double()  # [500, H·D]
    acts = torch.cat([z.clamp(min=0), (-z).clamp(min=0)], dim=1)  # [500, 2·H·D]
    W = torch.cat([torch.eye(H * D), -torch.eye(H * D)]).double()
    for h, head in enumerate(result.heads):
        zh = z[:, h * D : (h + 1) * D]
        var = ((zh - zh.mean(0)) ** 2).sum()
        assert head.explained == pytest.approx(1.0, abs=1e-6)  # every feature: exact
        top = [t.feature for t in head.top_features]
        assert len(top) == 10 and all(h * D <= f % (H * D) < (h + 1) * D for f in top)
        recon = (acts[:, top] @ W[top])[:, h * D : (h + 1) * D]
        res = zh - recon
        expected = 1 - ((res - res.mean(0)) ** 2).sum() / var
        assert head.top_explained == pytest.approx(float(expected), abs=1e-6)
        assert head.top_explained < 1
        # each feature reads one head's slice: all of its pre-activation is this head's (null:
        # a feature that never fired on these tokens)
        dfa = [t.dfa_share for t in head.top_features]
        assert all(x == pytest.approx(1.0) for x in dfa if x is not None)
        assert sum(x is not None for x in dfa) >= 8


def test_columns_and_panels_in_a_run(tmp_path) -> None:
    run = build_tiny_run(tmp_path)
    adapter = tiny_adapter("llama")
    s = adapter.spec
    folder = exact_sae(tmp_path / "saes" / "z_L1", 1, s.n_heads, s.d_head)
    result = z_heads([folder], adapter, data=tmp_path / "data.jsonl", n_tokens=200, seq_len=48)
    cols = add_to_run(run, result)
    assert cols == [
        "zsae_class",
        "zsae_top_feature_share",
        "zsae_explained",
        "zsae_top10_explained",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["levels"]["zsae_class"]["4"] == "polysemantic"
    i = metrics["columns"].index("zsae_class")
    by_head = {f"L{r[0]}H{r[1]}": r[i] for r in metrics["rows"]}
    assert by_head["L0H0"] is None  # no z dictionary for layer 0
    assert by_head["L1H0"] in (1, 2, 3, 4)
    assert "Model-wide: 4 heads" in metrics["docs"]["zsae_class"]
    head = json.loads((run / "heads" / "L1H2.json").read_text())
    assert head["zsae"]["head"] == "L1H2" and len(head["zsae"]["top_features"]) == 10
    assert head["zsae"]["tally"] == result.tally
    assert head["metrics"]["zsae_explained"] == pytest.approx(1.0, abs=1e-6)
    assert "zsae" not in json.loads((run / "heads" / "L0H0.json").read_text())


def test_folders_must_hold_a_z_dictionary(tmp_path) -> None:
    with pytest.raises(InputError, match="no z dictionary"):
        z_folders(tmp_path)


def test_the_command(tmp_path, capsys) -> None:
    from headscope.cli import main

    planted_sae(tmp_path / "saes" / "z_L3")
    assert main(["z-heads", str(tmp_path / "saes"), "--tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "L3H2     bisemantic" in out and "not measured" in out
    assert main(["z-heads", str(tmp_path / "saes"), "--tokens", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tally"]["polysemantic"] == 1
    # bad input: one line, exit 2, no traceback
    assert main(["z-heads", str(tmp_path / "saes"), "--tokens", "0", "--add-column"]) == 2
    assert main(["z-heads", str(tmp_path / "nothing"), "--tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs a RUN" in err and "is not a folder" in err and "Traceback" not in err
