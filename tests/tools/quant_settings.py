"""Small calibration settings shared by the quantize tests (fast on two CPU cores)."""

FAST = {"num_samples": 4, "seq_len": 32, "eval_max_tokens": 256, "progress": False}
