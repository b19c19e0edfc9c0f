"""Expected failures of the command line end as one line on stderr with the error's exit code,
never a traceback: unusable data (before the model loads, leaving no run behind), an offline hub
id, bad input, an occupied output folder, a malformed HeadVis tree, a closed pipe, and Ctrl-C
during a precompute (which then resumes)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import headscope.model  # noqa: F401  (import cost paid here, not inside timed calls)
from headscope.cli import main
from tests.tiny_models import save_tiny, write_texts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("cli-errors") / "model")


def _one_line_error(capsys, code: int, rc: int, command: str) -> str:
    """Assert exit code ``code`` and exactly one line on stderr naming ``command``; return it."""
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"headscope {command}: error: "), err
    return lines[0]


# ----- precompute on data with no readable document ------------------------------------------------
def _precompute(tiny: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "precompute",
            "--model",
            str(tiny),
            "--data",
            str(data),
            "--out",
            str(out),
            "--sequences",
            "2",
            "--seq-len",
            "16",
            *extra,
        ]
    )


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: bad data must be refused before that."""
    from headscope.model import ModelAdapter

    def load(*_a, **_k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(ModelAdapter, "load", load)


def test_precompute_empty_file(tiny, tmp_path, capsys, no_model_load):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    rc = _precompute(tiny, data, tmp_path / "run")
    line = _one_line_error(capsys, 2, rc, "precompute")
    assert line.endswith(f"no documents in {data}: it is empty")
    assert not (tmp_path / "run").exists()


def test_precompute_all_lines_malformed(tiny, tmp_path, capsys, no_model_load):
    data = tmp_path / "bad.jsonl"
    data.write_text('not json\n{"text": \n[1, 2]\n{"text": 5}\n')
    rc = _precompute(tiny, data, tmp_path / "run")
    line = _one_line_error(capsys, 2, rc, "precompute")
    assert f"no readable document in {data}: read 0 documents, skipped 4: " in line
    assert "3 malformed JSON (bad.jsonl:1, bad.jsonl:2, bad.jsonl:3)" in line
    assert "1 not a string (bad.jsonl:4)" in line
    assert not (tmp_path / "run").exists()


def test_precompute_wrong_text_field(tiny, tmp_path, capsys, no_model_load):
    data = write_texts(tmp_path / "data.jsonl", n_docs=7)
    rc = _precompute(tiny, data, tmp_path / "run", "--text-field", "body")
    line = _one_line_error(capsys, 2, rc, "precompute")
    assert "read 0 documents, skipped 7: 7 missing field (data.jsonl:1," in line
    assert "the rows have no 'body' field (the first row's fields: id, text)" in line
    assert line.endswith("--text-field")
    assert not (tmp_path / "run").exists()


# ----- models and live operations ---------------------------------------------------------------
def test_offline_hub_id_fails_fast_without_network(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # an empty Hugging Face cache, and any attempt to reach a network is recorded
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    attempts: list[object] = []

    def connect(_sock, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    t0 = time.perf_counter()
    rc = main(["info", "--model", "gpt2"])
    elapsed = time.perf_counter() - t0
    line = _one_line_error(capsys, 3, rc, "info")
    assert "'gpt2'" in line and "not in the local Hugging Face cache" in line
    assert attempts == []
    assert elapsed < 10, f"{elapsed:.1f} s: retries?"


def test_unknown_head(tiny, capsys):
    rc = main(
        [
            "attribute",
            "qk",
            "--model",
            str(tiny),
            "--text",
            "the cat sat on the mat",
            "--head",
            "L99H0",
            "--query",
            "3",
            "--key",
            "1",
        ]
    )
    line = _one_line_error(capsys, 2, rc, "attribute qk")
    assert "unknown head 'L99H0'" in line


def test_text_too_long(tiny, capsys):
    from headscope.limits import MAX_TOKENS

    rc = main(["tokenize", "--model", str(tiny), "--text", "a" * (MAX_TOKENS + 10)])
    line = _one_line_error(capsys, 2, rc, "tokenize")
    assert f"the limit is {MAX_TOKENS}" in line


# ----- outputs and imports --------------------------------------------------------------------------
def test_export_static_onto_a_non_empty_folder(tiny_run, tmp_path, capsys):
    run = tiny_run()
    capsys.readouterr()  # what building the run printed
    out = tmp_path / "site"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", "static", str(run), str(out)])
    line = _one_line_error(capsys, 2, rc, "export static")
    assert "is not an empty folder" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("config", [None, '{"model_name": ', "[1, 2]"])
def test_import_malformed_headvis_tree(tmp_path, capsys, config):
    tree = tmp_path / "tree"
    (tree / "heads").mkdir(parents=True)
    if config is not None:
        (tree / "config.json").write_text(config)
    rc = main(["import", "headvis", str(tree), str(tmp_path / "run")])
    line = _one_line_error(capsys, 2, rc, "import headvis")
    assert str(tree) in line
    assert not (tmp_path / "run").exists()


# ----- a closed pipe and Ctrl-C (real processes) -------------------------------------------------
def _env() -> dict[str, str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


def test_closed_pipe(tiny):
    # head has read its byte and exited before headscope writes anything (echo feeds it
    # first), so every write of headscope meets a closed pipe.
    cmd = shlex.join(
        [sys.executable, "-m", "headscope", "tokenize", "--model", str(tiny), "--text", "hi " * 300]
    )
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; (echo; {cmd}) | head -c 1"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_ctrl_c_during_precompute_then_resume(tiny, tmp_path):
    data = write_texts(tmp_path / "data.jsonl", n_docs=200)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "headscope",
        "precompute",
        "--model",
        str(tiny),
        "--data",
        str(data),
        "--out",
        str(out),
        "--sequences",
        "150",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "1",
    ]
    # A process started in the background by a non-interactive shell inherits SIGINT ignored:
    # give the child the default Ctrl-C behaviour a terminal user has.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        ckpt = out / "checkpoint" / "rank0-of-1.safetensors"
        deadline = time.monotonic() + 300
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (
        "headscope precompute: interrupted; the run resumes from its last checkpoint when you "
        "run the same command again"
    ), err
    assert sum("headscope precompute" in line for line in lines) == 1, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"

    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stderr
    resumed = int(again.stderr.split("resuming after ")[1].split()[0])
    assert 0 < resumed < 150
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["tokens"]["sequences"] == 150
    assert not (out / "checkpoint").exists()
