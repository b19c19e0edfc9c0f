"""The dictionary pipeline on a tiny model: one-stream training, feature labels, head reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from headscope.dictionaries import activations as act_mod
from headscope.dictionaries import load_sae, save_sae
from headscope.dictionaries.activations import capture_sites
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.labels import MAX_CARD_BYTES, _fit, marked_token, sae_site
from headscope.dictionaries.pipeline import (
    TrainConfig,
    dictionary_sites,
    train_dictionaries,
    train_sites,
)
from headscope.dictionaries.reports import value_cluster_report, z_head_report
from headscope.dictionaries.sae import SAE, SAEConfig
from headscope.precompute.sequences import batched, iter_sequences, stack
from tests.tiny_models import tiny_adapter, write_texts

SITES = [("resid", (0,)), ("resid", (2,)), ("z", (1,)), ("v", (0, 1))]
KEYS = ["resid_L0", "resid_L2", "z_L1", "v_L0+L1"]
N_TOKENS, N_EVAL, LABEL_TOKENS, SEQ_LEN = 6000, 1000, 3000, 64


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and shares the cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run of two resid SAEs, a z SAE and a two-layer v SAE, labelled."""
    root = tmp_path_factory.mktemp("dictionaries")
    adapter = tiny_adapter("llama")
    data = write_texts(root / "texts.jsonl", n_docs=200)
    calls: list[list] = []
    real = act_mod.capture_sites

    def spy(adapter_, ids, sites):
        calls.append(list(sites))
        return real(adapter_, ids, sites)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(act_mod, "capture_sites", spy)
        result = train_sites(
            adapter,
            data,
            SITES,
            out=root / "run",
            n_features=64,
            k=4,
            n_tokens=N_TOKENS,
            n_eval=N_EVAL,
            seq_len=SEQ_LEN,
            batch_size=8,
            sae_batch_size=256,
            lr=3e-3,
            label_tokens=LABEL_TOKENS,
            log=None,
        )
    return adapter, data, root / "run", result, calls


def test_one_stream_trains_every_site_into_loadable_folders(trained) -> None:
    adapter, _, run, result, calls = trained
    assert calls and all(c == SITES for c in calls)  # every forward pass fed all four SAEs
    assert sorted(result["saes"]) == sorted(KEYS)
    s = adapter.spec
    widths = {"resid": s.d_model, "z": s.n_heads * s.d_head, "v": 2 * s.n_kv_heads * s.d_head}
    for key, (site, layers) in zip(KEYS, SITES, strict=True):
        sae = load_sae(run / key)
        assert (sae.cfg.site, sae.cfg.layers, sae.cfg.d_in) == (site, layers, widths[site])
        assert sae.cfg.d_sae == 64 and sae.cfg.k == 4
        assert sae.cfg.normalize_activations == "none"  # scale folded in: SAELens computes the same
        record = json.loads((run / key / "stats.json").read_text())
        st = record["stats"]
        assert st["tokens"] == N_TOKENS and st["n_eval"] == N_EVAL
        assert st["normalized_mse"] == pytest.approx(1 - st["explained_variance"])
        assert 0 < st["explained_variance"] <= 1 and 0 <= st["dead_fraction"] <= 1
        assert st["mean_l0"] <= 4
        assert TrainConfig.from_dict(record["config"]).sites == tuple(KEYS)
        assert record["sequences_seen"] * (SEQ_LEN - 1) >= N_TOKENS + N_EVAL
    assert sorted(DictionarySet(run).by_layer) == [0, 2]  # z and v are not a residual basis


def test_site_lists_and_argument_errors() -> None:
    assert dictionary_sites("resid", [3, 1]) == [("resid", (3,)), ("resid", (1,))]
    assert dictionary_sites("v", [4, 3]) == [("v", (3, 4))]
    with pytest.raises(ValueError, match="one or two"):
        dictionary_sites("v", [1, 2, 3])
    with pytest.raises(ValueError, match="site must be"):
        dictionary_sites("mlp", [1])
    adapter = tiny_adapter("llama")
    with pytest.raises(ValueError, match="out of range"):
        train_dictionaries(adapter, None, "z", [7], out=Path("/nonexistent"), n_features=8, k=2)
    with pytest.raises(ValueError, match="one layer"):
        train_sites(adapter, None, [("z", (0, 1))], out=Path("/nonexistent"))
    d = adapter.spec.d_model
    for hook, expected in (("blocks.1.hook_resid_pre", (1,)), ("blocks.1.hook_resid_post", (2,))):
        cfg = SAEConfig.from_dict({"d_in": d, "d_sae": 8, "k": 2, "hook_name": hook})
        assert sae_site(adapter, SAE(cfg)) == ("resid", expected)
    with pytest.raises(ValueError, match="resid_mid"):
        cfg = SAEConfig.from_dict(
            {"d_in": d, "d_sae": 8, "k": 2, "hook_name": "blocks.1.hook_resid_mid"}
        )
        sae_site(adapter, SAE(cfg))


def _stream_acts(adapter, data, sae, key, skip: int, n_tokens: int):
    """Brute force: the SAE's activations [N, F] on the labelling stretch and each row's window."""
    seqs = iter_sequences(adapter.tokens, data, SEQ_LEN)
    for _ in range(skip):
        next(seqs)
    rows, windows, seen = [], [], 0
    for batch in batched(seqs, 8):
        packed = stack(batch, adapter.tokens.bos_id)
        ids, valid = packed.ids, packed.valid
        x = capture_sites(adapter, ids, [(sae.cfg.site, sae.cfg.layers)])[key]
        with torch.no_grad():
            a = sae.encode(x)  # [B, T, F]
        for b in range(ids.shape[0]):
            for t in range(1, int(valid[b].sum())):
                if seen == n_tokens:
                    break
                rows.append(a[b, t])
                windows.append((ids[b], t))
                seen += 1
    return torch.stack(rows), windows


def _context(adapter, ids, t: int, n: int = 8) -> str:
    toks = [adapter.tokens.display(int(i)) for i in ids]
    left = "".join(toks[max(1, t - n) : t])
    right = "".join(toks[t + 1 : t + n + 1])
    return f"{left}⟦{toks[t]}⟧{right}"


def test_top_contexts_are_where_each_feature_fires_most(trained) -> None:
    adapter, data, run, _, _ = trained
    meta = json.loads((run / "resid_L2" / "features_meta.json").read_text())
    recorded = json.loads((run / "resid_L2" / "stats.json").read_text())["sequences_seen"]
    assert meta["skip_sequences"] == recorded > 0  # labels come from text after training's
    assert meta["tokens_seen"] == LABEL_TOKENS
    sae = load_sae(run / "resid_L2")
    acts, windows = _stream_acts(adapter, data, sae, "resid_L2", recorded, LABEL_TOKENS)
    contexts = [_context(adapter, ids, t) for ids, t in windows]
    cards = json.loads((run / "resid_L2" / "features.json").read_text())
    assert sorted(cards, key=int) == [str(i) for i in range(64)]
    n_checked = 0
    for f in range(64):
        card = cards[str(f)]
        col = acts[:, f]
        assert 0 <= card["density"] <= 1
        assert card["density"] == pytest.approx(float((col > 0).float().mean()), rel=1e-3)
        if col.max() <= 0:
            assert card["top_contexts"] == [] and card["density"] == 0
            continue
        n_checked += 1
        assert card["top_acts"] == sorted(card["top_acts"], reverse=True)
        assert card["top_acts"][0] == pytest.approx(float(col.max()), rel=1e-3)
        best = {contexts[i] for i in torch.nonzero(col >= col.max() * (1 - 1e-4)).flatten()}
        assert card["top_contexts"][0] in best
        assert len(set(card["top_contexts"])) == len(card["top_contexts"])
        for text, value in zip(card["top_contexts"], card["top_acts"], strict=True):
            at = [float(col[i]) for i, c in enumerate(contexts) if c == text]
            assert any(v == pytest.approx(value, rel=1e-3) for v in at)
            assert marked_token(text) in text
    assert n_checked > 10


def _display_to_id(adapter) -> dict[str, int]:
    return {adapter.tokens.display(i): i for i in range(adapter.tokens.vocab_size)}


def _assert_promoted(adapter, card_tokens: list[str], direction: torch.Tensor) -> None:
    """card tokens are the 8 largest of direction · final-norm weight @ W_U (up to float ties)."""
    w_u = adapter.unembed()[0].double()
    logits = (direction.double() * adapter.ln_final().weight.double()) @ w_u  # [V]
    ids = [_display_to_id(adapter)[t] for t in card_tokens]
    assert len(ids) == 8
    eighth = logits.topk(8).values[-1]
    assert all(float(logits[i]) >= float(eighth) - 1e-6 for i in ids)


def test_promoted_tokens_follow_the_readout_of_each_site(trained) -> None:
    adapter, _, run, _, _ = trained
    s = adapter.spec
    for key in KEYS:
        sae = load_sae(run / key)
        cards = json.loads((run / key / "features.json").read_text())
        for f in (0, 7, 33):
            row = sae.W_dec[f].detach()
            if key.startswith("resid"):
                direction = row
            elif key == "z_L1":
                w_o = adapter.weights(1).W_O
                direction = sum(row.view(s.n_heads, s.d_head)[h] @ w_o[h] for h in range(s.n_heads))
            else:
                direction = torch.zeros(s.d_model)
                for i, layer in enumerate((0, 1)):
                    w = adapter.weights(layer)
                    v = row.view(2, s.n_kv_heads, s.d_head)[i]
                    for h in range(s.n_heads):
                        direction += v[int(w.kv_of_head[h])] @ w.W_O[h]
            _assert_promoted(adapter, cards[str(f)]["promoted"], direction)


def test_cards_stay_small(trained) -> None:
    _, _, run, _, _ = trained
    for key in KEYS:
        cards = json.loads((run / key / "features.json").read_text())
        for card in cards.values():
            assert len(json.dumps(card, ensure_ascii=False).encode()) <= MAX_CARD_BYTES
    big = {"density": 0.5, "top_contexts": ["x" * 400] * 8, "top_acts": [1.0] * 8, "promoted": []}
    fitted = _fit(big)
    assert len(json.dumps(fitted).encode()) <= MAX_CARD_BYTES
    assert 0 < len(fitted["top_contexts"]) == len(fitted["top_acts"]) < 8


def test_z_report_shares_sum_to_one(trained) -> None:
    _, _, run, _, _ = trained
    report = z_head_report(run / "z_L1")
    assert report["ranked_by"] == "share × density"
    assert [h["head"] for h in report["heads"]] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    for feat in report["features"]:
        assert sum(feat["shares"]) == pytest.approx(1.0, abs=1e-3)
        assert feat["share"] == max(feat["shares"])
    assert sum(h["activity"] for h in report["heads"]) == pytest.approx(1.0)
    assert sum(h["n_dominant"] for h in report["heads"]) == report["n_live"]
    for head in report["heads"]:
        assert 1 <= len(head["top_features"]) <= 10
        assert 1 <= head["effective_groups"] <= head["n_groups"] <= len(head["top_features"])
        assert all("context" in t and "promoted" in t for t in head["top_features"])
    saved = json.loads((run / "z_L1" / "head_report.json").read_text())
    assert saved["heads"][0]["head"] == "L1H0"
    assert "| L1H3 |" in (run / "z_L1" / "head_report.md").read_text()


def test_planted_z_feature_is_attributed_to_its_head(tmp_path) -> None:
    H, D, F = 4, 8, 16
    cfg = SAEConfig(d_in=H * D, d_sae=F, k=2, site="z", layers=(1,), extra={"n_heads": H})
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec[5] = 0
        sae.W_dec[5, 2 * D : 3 * D] = torch.randn(D)  # written by head 2 only
    save_sae(sae, tmp_path / "z_L1")
    cards = {
        str(f): {
            "density": 0.5 if f == 5 else 0.01,
            "top_contexts": [f"a⟦tok{f}⟧b"],
            "top_acts": [1.0],
            "promoted": [" x"] if f in (3, 5) else [f" p{f}"],
        }
        for f in range(F)
    }
    (tmp_path / "z_L1" / "features.json").write_text(json.dumps(cards))
    report = z_head_report(tmp_path / "z_L1")
    feat = report["features"][5]
    assert feat["dominant"] == "L1H2" and feat["share"] == pytest.approx(1.0)
    assert feat["shares"][:2] == [0.0, 0.0] and feat["shares"][3] == 0.0
    head2 = report["heads"][2]
    assert head2["top_features"][0]["feature"] == 5
    assert head2["top_features"][0]["context"] == "a⟦tok5⟧b"
    groups = {t["feature"]: t["group"] for t in head2["top_features"]}
    if 3 in groups:  # features 3 and 5 share a promoted token: one group
        assert groups[3] == groups[5]
    # Without features.json the ranking falls back to shares alone.
    (tmp_path / "z_L1" / "features.json").unlink()
    bare = z_head_report(tmp_path / "z_L1")
    assert bare["ranked_by"] == "share" and bare["features"][5]["dominant"] == "L1H2"


def test_value_clusters_and_their_svg(trained) -> None:
    _, _, run, result, _ = trained
    folder = run / "v_L0+L1"
    assert "clusters" in result["saes"]["v_L0+L1"]  # written by the training run
    report = value_cluster_report(folder, ks=(2, 4))
    assert report["columns"] == ["L0KV0", "L0KV1", "L1KV0", "L1KV1"]
    assert report["kv_heads"]["L1KV1"] == ["L1H2", "L1H3"]
    assert report["n_clustered"] + report["n_dead_excluded"] == 64
    for k, entry in report["sweep"].items():
        assert len(entry["sizes"]) == int(k) and sum(entry["sizes"]) == report["n_clustered"]
    assert sum(report["mean_loading"]) == pytest.approx(1.0, abs=1e-3)
    assert json.loads((folder / "clusters.json").read_text())["sweep"].keys() == {"2", "4"}
    root = ET.parse(folder / "cluster_sizes.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
