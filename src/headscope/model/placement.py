"""Where a model's weights live: one device, or sharded by accelerate over several devices with
CPU and disk offload (for a model that does not fit one device).

A placement is written as the ``device`` string every command already takes:

- ``cpu``, ``cuda``, ``cuda:1``, ``mps``: the whole model on that device;
- ``auto``: accelerate's ``device_map="auto"``: layers spread over every visible GPU, then CPU
  memory, then disk (memory-mapped from the checkpoint where it is safetensors, else written to
  an offload folder);
- ``auto:0=70GiB,1=70GiB,cpu=200GiB``: the same with a memory cap per device (GPU index,
  ``cpu``); what does not fit the caps goes to disk. ``auto:cpu=2GiB`` on a machine without a
  GPU keeps 2 GiB of layers in memory and reads the rest from disk.

Under ``torchrun`` (``LOCAL_WORLD_SIZE`` processes per node) a bare ``auto`` gives each local
process its own share of the node's GPUs (process r of n: GPUs r*G/n .. (r+1)*G/n - 1), so data
parallelism across processes and nodes combines with model sharding inside each process; each
process keeps its own offload folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from headscope.errors import InputError

_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def is_sharded(device: str) -> bool:
    """Whether ``device`` asks for an accelerate placement (``auto`` or ``auto:...``)."""
    return device == "auto" or device.startswith("auto:")


def max_memory(device: str) -> dict[int | str, str] | None:
    """The per-device memory caps of ``auto:...`` (None: accelerate's defaults, or this
    process's share of the node's GPUs under torchrun)."""
    if device == "auto":
        return _local_share()
    caps: dict[int | str, str] = {}
    for part in device.removeprefix("auto:").split(","):
        name, sep, size = part.strip().partition("=")
        name, size = name.strip(), size.strip()
        if not sep or not _SIZE.match(size) or not (name == "cpu" or name.isdigit()):
            raise InputError(
                f"bad device placement {device!r}: expected auto or auto:DEV=SIZE,... with DEV "
                "a GPU index or cpu and SIZE like 20GiB (e.g. auto:0=20GiB,cpu=64GiB)"
            )
        caps[int(name) if name.isdigit() else name] = size
    return caps


def _local_share() -> dict[int | str, str] | None:
    """Under torchrun with several processes on a node: this process's GPUs, all of each."""
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_local <= 1 or n_gpus == 0:
        return None
    if n_gpus % n_local:
        raise InputError(
            f"{n_gpus} GPUs cannot be shared evenly by {n_local} processes per node: give "
            "auto:0=SIZE,1=SIZE,... per process, or a process count that divides the GPUs"
        )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    per = n_gpus // n_local
    caps: dict[int | str, str] = {
        i: f"{torch.cuda.get_device_properties(i).total_memory}B"
        for i in range(rank * per, (rank + 1) * per)
    }
    return caps


def offload_folder(cache: Path, model_name: str) -> Path:
    """This process's offload folder for ``model_name`` (one per torchrun rank)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_") or "model"
    rank = os.environ.get("RANK", "0")
    return cache / "offload" / f"{safe}-rank{rank}"


def from_pretrained_kwargs(device: str, cache: Path, model_name: str) -> dict[str, Any]:
    """What ``from_pretrained`` needs to place the model as ``device`` says (empty: one
    device, moved there after loading)."""
    if not is_sharded(device):
        return {}
    folder = offload_folder(cache, model_name)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"device_map": "auto", "offload_folder": str(folder)}
    caps = max_memory(device)
    if caps is not None:
        kwargs["max_memory"] = caps
    return kwargs


def input_device(model: Any) -> torch.device:
    """The device a sharded model takes its inputs on: the one its embedding runs on."""
    for where in model.hf_device_map.values():
        if isinstance(where, int):
            return torch.device("cuda", where)
        if where not in ("disk", "meta"):
            return torch.device(where)
    return torch.device("cpu")
