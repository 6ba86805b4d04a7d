"""compressed-tensors exports load in transformers by its own code (needs `compressed-tensors`).

Skipped where the package is missing (it is not a lowbit dependency); run it in an environment
that has it, e.g. `PYTHONPATH=. $QVENV/bin/python -m pytest tests/tools/test_ct_transformers.py`.
"""

from __future__ import annotations

import pytest
import torch
from quant_settings import FAST

import lowbit
from lowbit.tools.quantize.simulate import from_export

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 120, 64, 33, 200, 11, 90, 150, 2, 77]])
METHODS = ["w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a16", "fp8-dynamic", "fp8-static",
           "fp8-block", "w8a8-int8", "nvfp4", "nvfp4a16"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_transformers_loads_compressed_tensors_export(tiny_llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    lowbit.quantize(str(tiny_llama), str(out), method, **FAST)
    # compressed-tensors' NVFP4 path computes in bf16 whatever the checkpoint dtype.
    dtype = torch.bfloat16 if method.startswith("nvfp4") else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    with torch.no_grad():
        got = hf(IDS).logits[0].float()
        expected = from_export(tiny_llama, out)(IDS).logits[0]
    if method == "nvfp4":
        # W4A4 in bf16 (compressed-tensors' only NVFP4 path) flips fp4 activation codes against
        # our fp32 run, so compare the activation quantizer itself, on the same input, exactly.
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        from lowbit.quant.numerics import fake_quant_activation

        lin = hf.model.layers[0].mlp.down_proj
        x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(0))
        ct = forward_quantize(lin, x, "input", lin.quantization_scheme.input_activations)
        ours = fake_quant_activation(x, "nvfp4", lin.input_global_scale.detach().float())
        torch.testing.assert_close(ct.float(), ours, rtol=0, atol=0)
        return
    tol = 0.15 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
