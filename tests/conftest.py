"""Shared fixtures: tiny random HF models (tests/tiny.py) built in tmp dirs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `from tiny import ...` from every test folder

from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny float32 Llama saved to a session-wide temporary directory."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model(path, "llama")
    return path
