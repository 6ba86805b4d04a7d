"""Build the model with the plan's schemes and stream the checkpoint into it, strictly."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lowbit.config import ModelConfig
from lowbit.layers.linear import LinearBase
from lowbit.loader.weights import iterate_tensors, safetensors_files, total_bytes
from lowbit.models.registry import model_class
from lowbit.quant.spec import QuantPlan

logger = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, plan: QuantPlan, dtype: torch.dtype, device) -> nn.Module:
    """Instantiate the architecture with uninitialized parameters directly on `device`.

    Parameters are created empty where they will live, so no full-precision copy is ever made
    first; schemes decide each parameter's (possibly packed) dtype and shape.
    """
    cls = model_class(cfg.architecture)
    with torch.device(device):
        model = cls(cfg, plan, dtype)
    return model.eval()


def load_checkpoint(model: nn.Module, model_dir: Path, plan: QuantPlan, progress: bool) -> None:
    """Stream every safetensors tensor of `model_dir` into `model`, then repack for kernels."""
    files = safetensors_files(model_dir)
    big = total_bytes(files) > 1 << 30
    bar = tqdm(
        total=total_bytes(files), unit="B", unit_scale=True, desc="Loading weights",
        disable=not (progress and big),
    )  # fmt: skip
    with bar:
        load_tensors(model, _counted(iterate_tensors(files), bar), plan)


def _counted(items, bar):
    """Advance the progress bar by each tensor's bytes."""
    for name, tensor, file in items:
        bar.update(tensor.numel() * tensor.element_size())
        yield name, tensor, file


def load_tensors(model: nn.Module, tensors: Iterable[tuple[str, Tensor, str]], plan: QuantPlan):
    """Route (name, tensor, file) into parameters; strict about missing, unexpected, mis-shaped."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for raw_name, raw_tensor, file in tensors:
        if model.skip_tensor(raw_name):
            continue
        for name, tensor in plan.transform(raw_name, raw_tensor):
            target, shard = _param_name(model, name)
            param = params.get(target)
            if param is None:
                if plan.expected_unused(name):
                    continue
                raise ValueError(
                    f"unexpected tensor {raw_name!r} in {file}: the model "
                    f"({model.config.architecture}) has no parameter {target!r}"
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            # Meta placeholders (online schemes) take the CPU tensor and place it themselves.
            if not param.is_meta:
                tensor = tensor.to(param.device)
            try:
                with torch.no_grad():
                    if shard is None:
                        loader(param, tensor)
                    else:
                        loader(param, tensor, shard)
            except (ValueError, RuntimeError, KeyError) as e:
                raise ValueError(f"cannot load tensor {raw_name!r} from {file}: {e}") from e
            owner, pname = target.rsplit(".", 1)
            module = model.get_submodule(owner)
            if isinstance(module, LinearBase):
                module.mark_loaded(pname, shard)
            loaded.add(target)
    _check_complete(model, loaded)
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.scheme.process_weights_after_loading(module)


def default_weight_loader(param: nn.Parameter, tensor: Tensor) -> None:
    """Copy a whole tensor into a plain parameter (embeddings, norms), checking the shape."""
    if param.shape != tensor.shape:
        raise ValueError(
            f"shape mismatch: expected {tuple(param.shape)}, checkpoint has {tuple(tensor.shape)}"
        )
    param.data.copy_(tensor)


def _param_name(model: nn.Module, name: str) -> tuple[str, object]:
    """Checkpoint name → (model param name, shard id or None) via the model's fused layers."""
    for fused, source, shard in model.stacked_params:
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{fused}."), shard
    return name, None


def _check_complete(model: nn.Module, loaded: set[str]) -> None:
    """Every required parameter (and every shard of fused ones) came from the checkpoint."""
    missing = []
    linear_params = set()
    for prefix, module in model.named_modules():
        if isinstance(module, LinearBase):
            missing += [f"{prefix}.{n}" for n in module.missing()]
            linear_params |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
    for name, _ in model.named_parameters():
        if name not in linear_params and name not in loaded:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:8]) + (f" … ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing tensors for: {shown}")


def init_dummy_weights(model: nn.Module, plan: QuantPlan, seed: int = 0) -> None:
    """Random weights at the real shapes (for benchmarks without a checkpoint), then repack."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_meta:  # an online scheme's placeholder: feed it like a checkpoint would
                rnd = torch.randn(param.shape, generator=gen) * 0.02
                param.weight_loader(param, rnd.to(param.dtype))
            elif name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.dtype.is_floating_point and param.dtype.itemsize > 1:
                # Small values keep activations finite through many layers.
                rnd = torch.randn(param.shape, generator=gen) * 0.02
                param.copy_(rnd.to(param.dtype))
            elif param.dtype.is_floating_point:  # fp8 codes
                param.copy_(torch.randn(param.shape, generator=gen).clamp(-2, 2).to(param.dtype))
            else:
                info = torch.iinfo(param.dtype)
                rnd = torch.randint(info.min, info.max, param.shape, generator=gen)
                param.copy_(rnd.to(param.dtype))
        for module in model.modules():
            if isinstance(module, LinearBase):
                module.scheme.process_weights_after_loading(module)
