"""Precompute on a tiny model: a run directory that opens; SIGKILL + resume and 2-process
torchrun give the uninterrupted single-process result; memory does not grow with tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headscope.store import open_run
from tests.tiny_models import save_tiny, write_texts

ARGS = ["--sequences", "24", "--seq-len", "48", "--batch-size", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    model = save_tiny("llama", root / "model")
    data = write_texts(root / "data.jsonl", n_docs=60)
    return root, model, data


def _cmd(model, data, out, extra=(), launcher=("-m", "headscope")):
    """The precompute command line; ``launcher`` replaces ``-m headscope`` (e.g. torchrun)."""
    return [
        sys.executable,
        *launcher,
        "precompute",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        *ARGS,
        *extra,
        "--json",
    ]


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, **kw)


def _outputs(run: Path) -> dict[str, str]:
    files = {
        p.relative_to(run).as_posix(): p.read_text() for p in sorted((run / "heads").glob("*.json"))
    }
    files["metrics.json"] = (run / "metrics.json").read_text()
    files["motifs/map.json"] = (run / "motifs" / "map.json").read_text()
    return files


@pytest.fixture(scope="module")
def reference(assets):
    root, model, data = assets
    out = root / "reference"
    result = _run(_cmd(model, data, out))
    assert result.returncode == 0, result.stderr
    return out


def test_run_directory_opens(reference):
    run = open_run(reference)
    m = run.metrics
    assert len(m) == 3 * 4 and {
        "layer",
        "head",
        "prev_token_score",
        "induction_score",
        "copying_score",
    } <= set(m.columns)
    assert m.drop(columns=["name"]).notna().all().all()
    similar = run.similar_heads("L1H2", 3)
    assert len(similar) == 3 and all(h != "L1H2" for h, _ in similar)
    head = run.head("L2H1")
    assert head["examples"] and all(
        len(e["tokens"]) == len(e["max_as_query"]) for e in head["examples"]
    )
    assert max(p.stat().st_size for p in (reference / "heads").glob("*.json")) < 500_000
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["dataset"]["sha256"]
    assert not (reference / "checkpoint").exists()


def test_sigkill_then_resume_equals_uninterrupted(assets, reference):
    root, model, data = assets
    out = root / "killed"
    proc = subprocess.Popen(
        _cmd(model, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    ckpt = out / "checkpoint" / "rank0-of-1.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"  # the killed directory says it is not complete
    with pytest.raises(ValueError, match="incomplete"):
        open_run(out)
    result = _run(_cmd(model, data, out))
    assert result.returncode == 0, result.stderr
    assert _outputs(out) == _outputs(reference)


def test_torchrun_two_processes_equal_one(assets, reference):
    import pandas as pd

    root, model, data = assets
    out = root / "dist"
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533")
    cmd = _cmd(model, data, out, launcher=(*torchrun, "-m", "headscope"))
    result = _run(cmd, input="")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = open_run(reference).metrics, open_run(out).metrics
    pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=0)
    for head in ("L0H0", "L1H3", "L2H2"):
        ea, eb = open_run(reference).head(head), open_run(out).head(head)
        assert [e["sequence"] for e in ea["examples"]] == [e["sequence"] for e in eb["examples"]]
        assert ea["buckets"] == eb["buckets"]


def test_existing_other_run_is_refused(assets, reference):
    root, model, data = assets
    result = _run(_cmd(model, data, reference, ["--seed", "5"]))
    assert result.returncode == 2 and "different configuration" in result.stderr


def _peak_rss_mb(cmd) -> float:
    code = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run({cmd!r}, capture_output=True, text=True); "
        "assert r.returncode == 0, r.stderr[-2000:]; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip())


def test_peak_memory_does_not_grow_with_tokens(assets):
    root, model, data = assets
    big = write_texts(root / "big.jsonl", n_docs=400)
    rss = {}
    for n in (64, 256):
        cmd = [
            sys.executable,
            "-m",
            "headscope",
            "precompute",
            "--model",
            str(model),
            "--data",
            str(big),
            "--out",
            str(root / f"mem{n}"),
            "--sequences",
            str(n),
            "--seq-len",
            "48",
            "--batch-size",
            "4",
            "--json",
        ]
        rss[n] = _peak_rss_mb(cmd)
    print(f"peak RSS: 64 sequences {rss[64]:.0f} MB, 256 sequences {rss[256]:.0f} MB")
    assert abs(rss[256] - rss[64]) / rss[64] < 0.15


def test_a_registered_metric_reaches_the_run(tmp_path):
    """docs/architecture.md, "How to add a metric": registering is all the wiring there is."""
    import pandas as pd
    import torch

    from headscope.metrics import METRICS, MetricPartial, register_metric
    from headscope.precompute import probes  # noqa: F401  (the built-in probes register first)
    from tests.tiny_models import build_tiny_run

    @register_metric("_test_mean_sink")
    def mean_sink(batch):
        """Mean attention to position 0 (a test metric)."""
        mask = batch.query_mask  # [B, T]
        total = (batch.pattern[..., 0] * mask[:, None]).sum((0, 2), dtype=torch.float64)
        count = mask.sum(dtype=torch.float64).expand(batch.n_heads).clone()
        return MetricPartial(total, count)

    @register_metric("_test_layer_index", kind="probe")
    def layer_index(probe):
        """The head's layer (a test probe)."""
        s = probe.adapter.spec
        return torch.arange(s.n_layers, dtype=torch.float32)[:, None].expand(-1, s.n_heads)

    try:
        run = build_tiny_run(tmp_path, sequences=4, motif_sequences=2)
    finally:
        del METRICS["_test_mean_sink"], METRICS["_test_layer_index"]
    table = pd.read_parquet(run / "metrics.parquet")
    # streaming metrics first, then probe and weight metrics, each in registration order
    assert list(table.columns[-5:]) == [
        "_test_mean_sink",
        "prefix_matching_score",
        "long_prefix_score",
        "copying_score",
        "_test_layer_index",
    ]
    assert (table["_test_mean_sink"] > 0).all() and table["_test_mean_sink"].le(1).all()
    assert table["_test_layer_index"].tolist() == table["layer"].astype(float).tolist()
    head = json.loads((run / "heads" / "L2H1.json").read_text())
    assert head["metrics"]["_test_layer_index"] == 2.0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["_test_mean_sink"] == "Mean attention to position 0 (a test metric)."
