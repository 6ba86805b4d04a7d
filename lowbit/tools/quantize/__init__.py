"""Calibrated offline quantization: `lowbit quantize` / `lowbit.quantize(...)`."""
