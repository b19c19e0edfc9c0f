"""A model sharded by accelerate (``--device auto:...``) gives the unsplit model's results: a tiny
model forced to keep some layers in memory and read the rest from disk captures the same bits,
attributes the same, resumes the same, and its precompute (one process, and torchrun with two
processes each holding a split copy) equals the unsplit single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headscope.analysis.attribution import ov_attribution, qk_attribution
from headscope.analysis.session import Session
from headscope.errors import InputError
from headscope.model import ModelAdapter
from headscope.model.placement import from_pretrained_kwargs, max_memory
from headscope.store import open_run
from tests.tiny_models import random_tokens, save_tiny, write_texts
from tests.unit.test_resumable_state import assert_same

# Room for the embedding and about one layer of a tiny model: the rest goes to disk.
SPLIT = "auto:cpu=100KB"
TEXT = "the cat sat on the mat; the cat sat on the mat again"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offload_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))


def test_placement_strings():
    assert max_memory("auto:0=20GiB,1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert max_memory("auto") is None  # no torchrun, no GPU: accelerate's defaults
    assert from_pretrained_kwargs("cuda:1", Path("/x"), "m") == {}
    for bad in ("auto:", "auto:gpu0=1GiB", "auto:0=lots", "auto:cpu"):
        with pytest.raises(InputError, match="bad device placement"):
            max_memory(bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_offloaded_model_equals_the_unsplit_one(arch, tmp_path, one_thread):
    folder = save_tiny(arch, tmp_path / arch)
    whole = ModelAdapter.load(str(folder))
    split = ModelAdapter.load(str(folder), device=SPLIT)
    placed = set(split.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, split.model.hf_device_map
    assert split.device == torch.device("cpu")
    ids = random_tokens(12, seed=5)
    a = whole.run(ids, residuals=True, logits=True)
    b = split.run(ids, residuals=True, logits=True)
    assert torch.equal(a.logits, b.logits)
    assert_same(a, b)
    for layer in range(whole.spec.n_layers):
        assert torch.equal(a.layers[layer].pattern, b.layers[layer].pattern)
        wa, wb = whole.weights(layer), split.weights(layer)
        assert all(
            torch.equal(x, y) for x, y in zip(vars(wa).values(), vars(wb).values(), strict=True)
        )
        assert torch.equal(whole.ln_attn(layer).weight, split.ln_attn(layer).weight)
    assert torch.equal(whole.unembed()[0], split.unembed()[0])
    assert torch.equal(whole.embed_matrix(), split.embed_matrix())
    # live analysis: the resumable state and every attribution the same
    sa, sb = Session(whole), Session(split)
    for head in ("L0H1", "L2H3", "L1H0"):
        want = qk_attribution(sa, TEXT, head, -1, 4).model_dump()
        assert qk_attribution(sb, TEXT, head, -1, 4).model_dump() == want
    assert ov_attribution(sb, TEXT, "L2H1", -1, 3).model_dump() == (
        ov_attribution(sa, TEXT, "L2H1", -1, 3).model_dump()
    )
    assert_same(sa.state(TEXT).cap, sb.state(TEXT).cap)


def _precompute(model, data, out, device: str, launcher=("-m", "headscope"), cache=None):
    cmd = [
        sys.executable,
        *launcher,
        "precompute",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--sequences",
        "12",
        "--seq-len",
        "40",
        "--batch-size",
        "2",
        "--device",
        device,
        "--json",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "HEADSCOPE_CACHE": str(cache),
    }
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, input="")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _heads(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((run / "heads").glob("*.json"))}


def test_split_precompute_equals_unsplit_in_one_and_two_processes(tmp_path):
    import pandas as pd

    model = save_tiny("llama", tmp_path / "model")
    data = write_texts(tmp_path / "data.jsonl", n_docs=30)
    cache = tmp_path / "cache"
    whole = _precompute(model, data, tmp_path / "whole", "cpu", cache=cache)
    split = _precompute(model, data, tmp_path / "split", SPLIT, cache=cache)
    assert _heads(split) == _heads(whole)
    assert (split / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541")
    dist = _precompute(
        model, data, tmp_path / "dist", SPLIT, launcher=(*torchrun, "-m", "headscope"), cache=cache
    )
    # each rank offloaded its own copy
    assert sorted(p.name for p in (cache / "offload").iterdir()) == [
        "model-rank0",
        "model-rank1",
    ]
    a, b = open_run(whole).metrics, open_run(dist).metrics
    pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=0)
    for head in ("L0H0", "L1H3", "L2H2"):
        ea, eb = open_run(whole).head(head), open_run(dist).head(head)
        assert [e["sequence"] for e in ea["examples"]] == [e["sequence"] for e in eb["examples"]]
        assert ea["buckets"] == eb["buckets"]
