"""The model on another device: precompute, live operations and dictionary training give the
CPU's numbers and never mix device and host tensors.

CI has no GPU. ``tests/fake_cuda.py`` makes ``cuda`` a separate place for tensors backed by CPU
memory, raising where PyTorch on a GPU would ("Expected all tensors to be on the same device");
every number is still the CPU's own, so results must equal the CPU run exactly. These are the
failures the first GPU run of ``benchmarks/gpu.py`` found (a host mask meeting a device pattern in
the metrics, host SAE weights meeting device activations, host biases in the component basis).
"""

from __future__ import annotations

import json

import pytest
import torch

from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.sae import save_sae
from headscope.model import ModelAdapter
from headscope.operations import OPERATIONS, Context
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.runner import run_precompute
from tests.fake_cuda import DeviceMix, fake_cuda
from tests.tiny_models import save_tiny, write_texts
from tests.unit.test_feature_ov import _sae

TEXT = "abcab cabc aab. The quick brown fox; the quick brown fox jumps"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("model") / "llama")


def test_fake_cuda_raises_where_a_gpu_would():
    with fake_cuda():
        a = torch.ones(3).to("cuda")
        assert a.device.type == "cuda"
        assert (a + torch.tensor(2.0)).device.type == "cuda"  # host scalars mix
        assert float(a[torch.tensor([0, 2])].sum()) == 2.0  # host indices into a device tensor
        with pytest.raises(DeviceMix):
            _ = a + torch.ones(3)
        with pytest.raises(DeviceMix):
            a.numpy()
        assert (a.cpu() + torch.ones(3)).device.type == "cpu"


def test_precompute_on_the_device_equals_the_cpu(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    data = write_texts(tmp_path / "data.jsonl", n_docs=30)
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = PrecomputeConfig(
            model=str(model_dir),
            data=str(data),
            sequences=8,
            seq_len=40,
            batch_size=4,
            dtype="fp32",
            device=device,
        )
        with fake_cuda():
            runs[device] = run_precompute(cfg, tmp_path / device, progress=False)
    cpu, dev = runs["cpu"], runs["cuda"]
    assert (dev / "metrics.json").read_text() == (cpu / "metrics.json").read_text()
    for head in sorted((cpu / "heads").glob("*.json")):
        assert (dev / "heads" / head.name).read_text() == head.read_text(), head.name


# One request per live operation (dictionary operations read the dictionaries below).
REQUESTS = {
    "tokenize": {"text": TEXT},
    "attend": {"text": TEXT, "heads": ["L1H0", "L2H3"]},
    "rank-heads": {"text": TEXT, "query": -1, "key": 3},
    "attribute qk": {"text": TEXT, "head": "L2H1", "query": -1, "key": 5},
    "attribute ov": {"text": TEXT, "head": "L2H1", "query": -1, "key": 5},
    "composition": {"text": TEXT, "head": "L2H1", "query": -1, "key": 5},
    "intervene": {
        "text": TEXT,
        "heads": ["L2H1"],
        "component": "L1H0",
        "side": "key",
        "scale": 0.0,
        "key": 5,
    },
    "intervention-curve": {
        "text": TEXT,
        "heads": ["L2H1"],
        "component": "L1.mlp",
        "side": "key",
        "scales": [0.0, 1.0, 2.0],
        "key": 5,
        "at": [5],
    },
    "knockout": {"text": TEXT, "head": "L2H1", "keys": [5]},
    "ablate": {"text": TEXT, "heads": ["L1H0", "L2H1"]},
    "virtual-weights": {"head": "L1H0", "feature": 3},
    "head-loadings": {
        "text": TEXT,
        "layer": 0,
        "source_feature": 1,
        "source_pos": 4,
        "target_feature": 2,
        "target_pos": -1,
    },
    "edge-graph": {"text": TEXT, "layer": 1, "position": -1},
}
FEATURE_BASIS = {
    "attribute qk (features)": ("attribute qk", {**REQUESTS["attribute qk"], "basis": "sae"}),
    "attribute ov (features)": ("attribute ov", {**REQUESTS["attribute ov"], "basis": "sae"}),
}


@pytest.fixture(scope="module")
def dictionaries_dir(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("dicts")
    s = ModelAdapter.load(str(model_dir)).spec
    for layer in range(s.n_layers):
        save_sae(_sae(s.d_model, 32, "resid", layer, seed=layer), root / f"resid_L{layer}")
    return root


def _run(model_dir, dicts_dir, device: str, name: str, body: dict) -> dict:
    op = {o.name: o for o in OPERATIONS}[name]
    with fake_cuda():
        session = Session(ModelAdapter.load(str(model_dir), device=device))
        ctx = Context(session, lambda: DictionarySet(dicts_dir))
        return json.loads(op.run(ctx, op.request.model_validate(body)).model_dump_json())


@pytest.mark.parametrize("case", [*REQUESTS, *FEATURE_BASIS])
def test_live_operations_on_the_device_equal_the_cpu(model_dir, dictionaries_dir, case):
    name, body = FEATURE_BASIS.get(case, (case, REQUESTS.get(case)))
    cpu = _run(model_dir, dictionaries_dir, "cpu", name, body)
    dev = _run(model_dir, dictionaries_dir, "cuda", name, body)
    assert dev == cpu


def test_dictionary_training_on_the_device_equals_the_cpu(model_dir, tmp_path, monkeypatch):
    from headscope.dictionaries.layerwise import LayerwiseConfig, train_layers
    from tests.unit.test_layerwise_dictionaries import SMALL

    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    data = write_texts(tmp_path / "data.jsonl", n_docs=30)
    tables = {}
    for device in ("cpu", "cuda"):
        with fake_cuda():
            adapter = ModelAdapter.load(str(model_dir), device=device)
            cfg = LayerwiseConfig(model=adapter.name, data=str(data), **SMALL)
            rows = train_layers(adapter, cfg, tmp_path / device, log=None, progress=False)
        tables[device] = [{**r.to_dict(), "seconds": None} for r in rows]
    assert tables["cuda"] == tables["cpu"]
