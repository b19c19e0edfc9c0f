"""Fixtures and settings shared by every test tier.

Property tests (hypothesis) are reproducible where it matters: under CI (``CI`` set) they run
derandomised with no example database, so a run never depends on the last run's failures or on
the random seed; locally they explore randomly and remember failures in ``.hypothesis/``
(ignored by git).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests.tiny_models import build_tiny_run

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(
    os.environ.get("HEADSCOPE_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_run(arch="llama", **overrides)``: a precomputed run of a tiny model, built once per
    test session for each distinct (arch, overrides) and shared; treat it as read-only."""
    built: dict[tuple, Path] = {}

    def get(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            root = tmp_path_factory.mktemp(f"tiny-run-{arch}")
            built[key] = build_tiny_run(root, arch, **overrides)
        return built[key]

    return get


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test's torch work on one thread: tiny matrices gain nothing from a second one, and
    OpenMP's spinning threads slow everything else sharing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
