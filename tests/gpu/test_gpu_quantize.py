"""`lowbit quantize` and `lowbit eval` on the GPU (demo model): calibration runs on CUDA, the
quality gate scores export and source one after the other (each engine holds a one-window KV
cache), and the export decodes on the GPU as it does on the CPU."""

from __future__ import annotations

import pytest
import torch
from gpu_util import gpu_device  # noqa: F401

import lowbit
from lowbit.loader.weights import DEMO_MODEL
from lowbit.tools.eval import run_eval

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["w4a16-gptq", "fp8-dynamic"])
def test_quantize_on_cuda_passes_gate(tmp_path, dev, method):
    if dev.type != "cuda":
        pytest.skip("needs CUDA (the whole engine runs)")
    report = lowbit.quantize(str(DEMO_MODEL), str(tmp_path / "out"), method, num_samples=16,
                             seq_len=128, device="cuda", eval_max_tokens=1024,
                             progress=False)  # fmt: skip
    assert report["status"] == "passed", report["reasons"]
    assert report["evaluated_with"] == "lowbit Engine"
    ev = report["eval"]
    assert 0 <= ev["kl_mean"] < (0.05 if method == "w4a16-gptq" else 0.01), ev
    assert ev["top1_agreement"] > 0.85, ev
    # The export loads with no flag on the GPU and decodes what the CPU decodes (greedy).
    prompt = "def fibonacci(n):\n"
    got = []
    for device in ("cuda", "cpu"):
        with lowbit.Engine(str(tmp_path / "out"), device=device, dtype="float32",
                           max_total_tokens=512, disable_cuda_graph=True) as e:  # fmt: skip
            out = e.generate(prompt, {"max_new_tokens": 8, "temperature": 0})
            got.append(out[0].outputs[0].token_ids)
    assert got[0] == got[1]


def test_eval_with_reference_on_cuda(dev):
    """Two engines in one process: sizing the KV cache from free memory left none for the second."""
    if dev.type != "cuda":
        pytest.skip("needs CUDA")
    before = torch.cuda.memory_allocated()
    res = run_eval(str(DEMO_MODEL), str(DEMO_MODEL), max_tokens=512, seq_len=256,
                   device="cuda", dtype="float32")  # fmt: skip
    assert res.kl_mean is not None and res.kl_mean < 1e-6
    assert res.top1_agreement == 1.0
    # both engines released: their weights alone (float32 demo model) are 33 MB
    assert torch.cuda.memory_allocated() - before < 8 * 2**20
