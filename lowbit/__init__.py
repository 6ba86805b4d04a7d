"""lowbit: an inference engine for quantized large language models."""

from lowbit.engine.engine import Engine
from lowbit.engine.request import CompletionOutput, RequestOutput, SamplingParams, StreamDelta

__version__ = "0.1.0"


def quantize(*args, **kwargs):
    """Calibrated offline quantization (`lowbit quantize`); not available yet."""
    raise NotImplementedError("lowbit.quantize is not available yet (offline quantization issue)")


__all__ = [
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "__version__",
    "quantize",
]
