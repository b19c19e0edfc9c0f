"""SAE config, model and SAELens-layout files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from headscope.dictionaries import (
    SAE,
    SAEConfig,
    SAEFormatError,
    hook_name_for,
    load_sae,
    parse_hook_name,
    save_sae,
)


def build_cfg(**overrides: Any) -> SAEConfig:
    kwargs: dict[str, Any] = dict(d_in=12, d_sae=40, k=5, site="z", layers=(3,), model_name="tiny")
    kwargs.update(overrides)
    return SAEConfig(**kwargs)


def randomize(sae: SAE, seed: int = 0) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return sae


def inputs(d_in: int, n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def write_saelens_folder(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "sae_weights.safetensors")
    save_file({"sparsity": torch.full((cfg["d_sae"],), -3.0)}, path / "sparsity.safetensors")
    return path


def random_weights(
    d_in: int, d_sae: int, seed: int = 0, threshold: bool = False
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=gen),
        "b_dec": torch.randn(d_in, generator=gen) * 0.1,
    }
    if threshold:
        w["threshold"] = torch.rand(d_sae, generator=gen) * 2
    return w


# --- config -------------------------------------------------------------------------------


def test_config_round_trips_with_extra_keys() -> None:
    cfg = build_cfg(
        extra={"context_size": 128, "dataset_path": "x"},
        normalize_activations="expected_average_only_in",
        norm_scaling_factor=2.5,
    )
    d = cfg.to_dict()
    assert d["activation_fn_kwargs"] == {"k": 5} and d["k"] == 5 and d["hook_layer"] == 3
    assert SAEConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_k_belongs_to_topk_only() -> None:
    standard = build_cfg(architecture="standard")
    assert standard.k is None and standard.to_dict()["activation_fn_str"] == "relu"
    assert SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "hook_point_layer": 2}).layers == (2,)


def test_hook_names_follow_transformerlens() -> None:
    assert build_cfg().hook_name == "blocks.3.attn.hook_z"
    assert hook_name_for("resid", 0) == "blocks.0.hook_resid_pre"
    assert hook_name_for("v", 7) == "blocks.7.attn.hook_v"
    two = build_cfg(site="v", layers=(4, 10))
    assert two.hook_name == "blocks.4.attn.hook_v+blocks.10.attn.hook_v"
    assert parse_hook_name(two.hook_name) == ("v", (4, 10))
    assert parse_hook_name("blocks.2.hook_mlp_out") == ("other", (2,))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"k": None}, "k"),
        ({"k": 41}, "k"),
        ({"architecture": "gated"}, "architecture"),
        ({"d_in": 0}, "d_in"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
        ({"dtype": "int8"}, "dtype"),
        ({"norm_scaling_factor": 2.0}, "norm_scaling_factor"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(SAEFormatError, match=match):
        build_cfg(**overrides)


# --- model + own files --------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, architecture: str) -> None:
    sae = randomize(SAE(build_cfg(architecture=architecture)))
    save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    x = inputs(12)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p)


def test_save_overwrites_in_place_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    save_sae(randomize(SAE(build_cfg()), seed=1), target)
    (target / "sparsity.safetensors").write_bytes(b"kept")
    second = randomize(SAE(build_cfg()), seed=2)
    save_sae(second, target)
    assert sorted(p.name for p in target.iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert torch.equal(load_sae(target).W_enc, second.W_enc)


def test_topk_encode_keeps_k_largest_after_relu() -> None:
    sae = randomize(SAE(build_cfg(apply_b_dec_to_input=False)))
    x = inputs(12)
    acts = sae.encode(x)  # [64, 40]
    pre = x @ sae.W_enc + sae.b_enc
    assert ((acts > 0).sum(-1) <= 5).all()
    kept = acts > 0
    assert torch.equal(acts[kept], pre[kept])
    kth = pre.topk(5, dim=-1).values[:, -1:]
    assert (
        pre[kept.logical_not() & (pre > 0)] <= kth.expand_as(pre)[kept.logical_not() & (pre > 0)]
    ).all()
    assert acts.shape == (64, 40) and sae.encode(x.view(8, 8, 12)).shape == (8, 8, 40)


def test_norm_scaling_applies_and_folds() -> None:
    cfg = build_cfg(normalize_activations="expected_average_only_in", norm_scaling_factor=0.25)
    sae = randomize(SAE(cfg))
    x = inputs(12) * 4
    plain = SAE(build_cfg())
    plain.load_state_dict(sae.state_dict())
    assert torch.allclose(sae.encode(x), plain.encode(x / 4))
    folded = sae.with_norm_scaling_folded()
    assert folded.cfg.normalize_activations == "none" and folded.cfg.norm_scaling_factor is None
    assert torch.allclose(folded.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(folded(x), sae(x), atol=1e-5)


# --- folders in SAELens's layout ----------------------------------------------------------


def test_loads_pre6_saelens_topk_folder(tmp_path: Path) -> None:
    cfg = {
        "architecture": "standard",  # SAELens < 6 spelled TopK as standard + activation topk
        "d_in": 8,
        "d_sae": 16,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "hook_name": "blocks.2.hook_resid_pre",
        "hook_layer": 2,
        "hook_head_index": None,
        "model_name": "gpt2-small",
        "dtype": "torch.float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "context_size": 128,
        "prepend_bos": True,
        "sae_lens_training_version": "3.2.0",
    }
    w = random_weights(8, 16)
    folder = write_saelens_folder(tmp_path / "sl", cfg, w)
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.site, sae.cfg.layers) == (
        "topk",
        3,
        "resid",
        (2,),
    )
    assert sae.cfg.model_name == "gpt2-small" and sae.cfg.normalize_activations == "none"

    x = inputs(8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(3, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert torch.allclose(sae.encode(x), expected)
    assert torch.allclose(sae.decode(expected), expected @ w["W_dec"] + w["b_dec"])

    # Keys headscope does not model survive a load -> save.
    save_sae(sae, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert (
        again["context_size"] == 128 and again["prepend_bos"] is True and again["device"] == "cpu"
    )
    assert again["sae_lens_training_version"] == "3.2.0"
    assert torch.equal(load_sae(tmp_path / "again").encode(x), sae.encode(x))


def test_loads_saelens_v6_topk_folder_with_metadata(tmp_path: Path) -> None:
    cfg = {
        "architecture": "topk",
        "d_in": 8,
        "d_sae": 16,
        "k": 4,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {
            "model_name": "gpt2-small",
            "hook_name": "blocks.5.attn.hook_z",
            "sae_lens_version": "6.5.0",
        },
    }
    w = random_weights(8, 16, seed=3)
    sae = load_sae(write_saelens_folder(tmp_path / "v6", cfg, w))
    assert (sae.cfg.site, sae.cfg.layers, sae.cfg.hook_name, sae.cfg.k) == (
        "z",
        (5,),
        "blocks.5.attn.hook_z",
        4,
    )
    x = inputs(8)
    pre = x @ w["W_enc"] + w["b_enc"]
    top = pre.topk(4, dim=-1)
    assert torch.allclose(
        sae.encode(x), torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    )
    out = sae.cfg.to_dict()
    assert (
        out["metadata"]["sae_lens_version"] == "6.5.0"
        and out["metadata"]["hook_name"] == "blocks.5.attn.hook_z"
    )


def test_loads_saelens_jumprelu_folder(tmp_path: Path) -> None:
    cfg = {
        "architecture": "jumprelu",
        "d_in": 8,
        "d_sae": 16,
        "dtype": "float32",
        "model_name": "gemma-2-2b",
        "hook_name": "blocks.12.hook_resid_post",
        "hook_layer": 12,
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
        "activation_fn_str": "relu",
    }
    w = random_weights(8, 16, seed=4, threshold=True)
    sae = load_sae(write_saelens_folder(tmp_path / "jr", cfg, w))
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.layers == (12,)
    x = inputs(8)
    pre = x @ w["W_enc"] + w["b_enc"]
    expected = pre.relu() * (pre > w["threshold"])
    acts = sae.encode(x)
    assert torch.allclose(acts, expected)
    assert ((pre > 0) & (pre <= w["threshold"])).any() and (
        acts[(pre > 0) & (pre <= w["threshold"])] == 0
    ).all()


# --- bad folders ----------------------------------------------------------------------------


def _good_folder(tmp_path: Path) -> Path:
    cfg = {
        "architecture": "topk",
        "k": 2,
        "d_in": 8,
        "d_sae": 16,
        "dtype": "float32",
        "hook_name": "blocks.0.hook_resid_pre",
    }
    return write_saelens_folder(tmp_path / "good", cfg, random_weights(8, 16))


def test_bad_folders_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEFormatError, match="does not exist"):
        load_sae(tmp_path / "nope")

    folder = _good_folder(tmp_path)
    load_sae(folder)

    (folder / "cfg.json").rename(folder / "cfg.bak")
    with pytest.raises(SAEFormatError, match="no cfg.json"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json is not valid JSON"):
        load_sae(folder)
    cfg = json.loads((folder / "cfg.bak").read_text())

    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="architecture 'gated'"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(SAEFormatError, match="'d_sae'"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEFormatError, match=r"missing tensor\(s\) \['threshold'\]"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))

    w = random_weights(8, 16)
    save_file({**w, "W_dec": w["W_dec"].T.contiguous()}, folder / "sae_weights.safetensors")
    with pytest.raises(
        SAEFormatError, match=r"W_dec has shape \[8, 16\], expected \[16, 8\].*transposed"
    ):
        load_sae(folder)
    save_file({k: v for k, v in w.items() if k != "b_enc"}, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match=r"missing tensor\(s\) \['b_enc'\]"):
        load_sae(folder)
    save_file({**w, "W_gate": torch.zeros(2)}, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="unexpected tensor"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match="no sae_weights.safetensors"):
        load_sae(folder)


def test_all_ones_scaling_factor_is_tolerated(tmp_path: Path) -> None:
    folder = _good_folder(tmp_path)
    w = random_weights(8, 16)
    save_file({**w, "scaling_factor": torch.ones(16)}, folder / "sae_weights.safetensors")
    assert torch.equal(load_sae(folder).W_enc, w["W_enc"])
