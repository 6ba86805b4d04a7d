"""Online quantization with calibration: `--quantization gptq|awq` on a full-precision checkpoint.

GPTQ and AWQ need activations, so they cannot run tensor by tensor while weights stream in. This
runs the calibrated algorithm layer by layer with the built-in calibration text into a cache
directory (keyed by the checkpoint's files and the method) and returns that directory, which the
engine then loads like any pre-quantized checkpoint. A second start reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from lowbit.loader.weights import safetensors_files

logger = logging.getLogger(__name__)

# SGLang's --quantization names that need calibration → lowbit quantize method.
ONLINE_CALIBRATED = {"gptq": "w4a16-gptq", "awq": "w4a16-awq"}


def cache_root() -> Path:
    """Where calibrated checkpoints are kept ($LOWBIT_CACHE or ~/.cache/lowbit/calibrated)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "calibrated"


def _fingerprint(model_dir: Path, method: str, num_samples: int, seq_len: int) -> str:
    """Hash of the checkpoint's files (name, size, mtime), its config and the settings."""
    h = hashlib.sha256(json.dumps([method, num_samples, seq_len]).encode())
    for f in [model_dir / "config.json", *safetensors_files(model_dir)]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def calibrated_checkpoint(
    model_dir: str | Path,
    quantization: str,
    num_samples: int = 128,
    seq_len: int = 512,
    device: str | None = None,
    progress: bool = True,
    eval_max_tokens: int = 2048,
) -> Path:
    """A pre-quantized copy of `model_dir` made with `quantization` ('gptq' | 'awq'), cached."""
    from lowbit.tools.quantize.api import quantize

    if quantization not in ONLINE_CALIBRATED:
        raise ValueError(f"online calibration supports {sorted(ONLINE_CALIBRATED)}, "
                         f"not {quantization!r}")  # fmt: skip
    model_dir = Path(model_dir)
    method = ONLINE_CALIBRATED[quantization]
    key = _fingerprint(model_dir, method, num_samples, seq_len)
    out = cache_root() / f"{model_dir.name}-{method}-{key}"
    if (out / "quantization_report.json").is_file():
        logger.info("using the calibrated %s checkpoint cached at %s", quantization, out)
        return out
    logger.info("calibrating %s with %s (built-in text) into %s", model_dir, method, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = "awq" if quantization == "awq" else "gptq"
    quantize(str(model_dir), str(out), method, format=fmt, num_samples=num_samples,
             seq_len=seq_len, overwrite=True, device=device, progress=progress,
             eval_max_tokens=eval_max_tokens)  # fmt: skip
    return out
