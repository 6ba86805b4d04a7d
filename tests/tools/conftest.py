"""Shared pieces of the quantize tests: one tiny Llama, small calibration settings."""

from __future__ import annotations

import pytest

# Small enough for CI on two CPU cores; large enough for every method's calibration path.
FAST = {"num_samples": 4, "seq_len": 32, "eval_max_tokens": 256, "progress": False}


@pytest.fixture(scope="session")
def tiny_src(tiny_llama):
    """The full-precision source checkpoint every quantize test starts from."""
    return tiny_llama
