"""`--dtype auto`: bf16 only where the device computes it natively (an AVX2-only CPU emulates
bfloat16 matrix products, ~6x slower than fp32 here), and the demo uses the same choice."""

from __future__ import annotations

import json

import torch

from headscope.cli import main
from headscope.model.loading import fast_dtype
from tests.tiny_models import save_tiny, write_texts


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bfloat16():
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert fast_dtype("cpu") == ("bf16" if native else "fp32")
    if not torch.cuda.is_available():
        assert fast_dtype("cuda") == "fp32"


def test_precompute_resolves_auto_and_records_the_dtype_it_used(tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "model")
    data = write_texts(tmp_path / "data.jsonl", n_docs=8)
    out = tmp_path / "run"
    args = ["precompute", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--sequences", "4", "--seq-len", "32", "--dtype", "auto", "--json"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dtype"] == fast_dtype("cpu")
    assert manifest["status"] == "complete"
