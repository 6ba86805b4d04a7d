"""lowbit: an inference engine for quantized large language models."""

from lowbit.engine.engine import Engine
from lowbit.engine.request import CompletionOutput, RequestOutput, SamplingParams, StreamDelta

__version__ = "0.1.0"


def quantize(model_path, export_dir, method, **kwargs):
    """Calibrated offline quantization and export (`lowbit quantize`); returns the report.

    Keyword arguments mirror the CLI flags: calib_data, num_samples, seq_len, group_size, ignore,
    format, overwrite, act_order, checkpoint_save_path, checkpoint_restore_path, device, ...
    """
    from lowbit.tools.quantize.api import quantize as _quantize

    return _quantize(model_path, export_dir, method, **kwargs)


__all__ = [
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "__version__",
    "quantize",
]
