"""Shared fixtures: deterministic seeds, and one SmolLM2 per session for the slow tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(hf_model, tokenizer) of the embedded SmolLM2-135M, loaded once per test session."""
    from nnsae.models import load_smollm2

    return load_smollm2()
