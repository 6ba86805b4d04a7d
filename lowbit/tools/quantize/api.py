"""`lowbit.quantize(...)`: validate → calibrate layer by layer → export → eval gate → publish."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowbit.loader.weights import resolve_model_path
from lowbit.tools.quantize.calibrate import CalibState, calibrate, matches
from lowbit.tools.quantize.export import publish, temp_dir_for, write_export
from lowbit.tools.quantize.gate import run_gate
from lowbit.tools.quantize.methods import Method, get_method
from lowbit.tools.quantize.source import SourceModel, linear_modules
from lowbit.tools.quantize.writers import get_writer
from lowbit.tools.textdata import calibration_windows, read_text_file

logger = logging.getLogger(__name__)


class QualityGateError(RuntimeError):
    """The export was written but its quality is abnormal (see quantization_report.json)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """Resolved settings of one quantization run (also the calibration-state fingerprint)."""

    method: str
    format: str
    group_size: int
    act_order: str | None = None  # None | "static" | "group" (see gptq.py)
    ignore: list[str] = field(default_factory=list)
    num_samples: int = 128
    seq_len: int = 512
    calib_data: str | None = None


def _resolve(method: Method, fmt, group_size, act_order, ignore, **kw) -> QuantizeOptions:
    """Check flag combinations that need no model; fill defaults."""
    fmt = fmt or method.default_format
    get_writer(fmt)  # unknown formats are named as such
    if fmt not in method.formats:
        raise ValueError(f"--format {fmt} does not fit --method {method.name}; "
                         f"it writes {', '.join(method.formats)}")  # fmt: skip
    if group_size is None:
        group_size = method.group_size
    elif method.weight != "int" and group_size != method.group_size:
        raise ValueError(f"--group-size is fixed at {method.group_size} for {method.name}")
    elif group_size == 0 or group_size < -1:
        raise ValueError(f"--group-size must be positive or -1 (per channel), got {group_size}")
    if act_order is True:
        act_order = "group"
    if act_order not in (None, False, "none", "static", "group"):
        raise ValueError(f"--act-order must be none, static or group, got {act_order!r}")
    if act_order not in (None, False, "none") and method.algorithm != "gptq":
        raise ValueError("--act-order applies to --method w4a16-gptq only")
    if act_order is None and method.algorithm == "gptq":
        act_order = "static"  # as llm-compressor: better accuracy, nothing extra stored
    act_order = None if act_order in (False, "none") else act_order
    if act_order == "group" and fmt == "awq":
        raise ValueError("--act-order cannot be written in AWQ format (no g_idx); use --format "
                         "compressed-tensors or gptq")  # fmt: skip
    return QuantizeOptions(method.name, fmt, group_size, act_order, list(ignore), **kw)


def _check_shapes(src: SourceModel, method: Method, opts: QuantizeOptions) -> list[str]:
    """Every quantized linear must fit the layout; returns the names left unquantized."""
    ignored = ["lm_head"] if not src.config.tie_word_embeddings else []
    G = opts.group_size
    for i in range(len(src.layers)):
        prefix = src.layer_prefix(i)
        for name, mod in linear_modules(src.layers[i], prefix).items():
            if matches(name, opts.ignore):
                ignored.append(name)
                continue
            N, K = mod.out_features, mod.in_features
            if method.weight == "int" and G != -1 and K % G:
                raise ValueError(f"--group-size {G} does not divide {name}'s in_features {K}; "
                                 f"pick a divisor of {K} (e.g. 32, 64, 128) or -1")  # fmt: skip
            if method.weight == "nvfp4" and K % 16:
                raise ValueError(f"{method.name} needs in_features divisible by 16; {name} "
                                 f"has {K}: add it to --ignore")  # fmt: skip
            if opts.format in ("awq", "gptq") and N % 8:
                raise ValueError(f"{opts.format} packs 8 output columns per word; {name} has "
                                 f"out_features {N}: add it to --ignore")  # fmt: skip
    return ignored


def _scale_dtype(opts: QuantizeOptions, src: SourceModel) -> torch.dtype:
    """On-disk dtype of the scales: AWQ/GPTQ fp16, ModelOpt fp32, compressed-tensors model dtype."""
    return {"awq": torch.float16, "gptq": torch.float16, "modelopt": torch.float32}.get(
        opts.format, src.checkpoint_dtype
    )


def quantize(
    model_path: str,
    export_dir: str,
    method: str,
    calib_data: str | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    group_size: int | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    format: str | None = None,  # noqa: A002 - the CLI's flag name
    overwrite: bool = False,
    act_order: bool | str | None = None,
    checkpoint_save_path: str | None = None,
    checkpoint_restore_path: str | None = None,
    device: str | None = None,
    eval_max_tokens: int = 2048,
    max_kl: float | None = None,
    max_ppl_ratio: float | None = None,
    min_top1: float | None = None,
    progress: bool = True,
) -> dict:
    """Quantize `model_path` with `method`, export to `export_dir`; returns the quality report.

    Raises QualityGateError (after writing the export, marked failed) when quality is abnormal.
    """
    m = get_method(method)
    opts = _resolve(
        m,
        format,
        group_size,
        act_order,
        ignore,
        num_samples=num_samples,
        seq_len=seq_len,
        calib_data=str(calib_data) if calib_data else None,
    )
    dst = Path(export_dir)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"export dir {dst} exists; pass --overwrite to replace it")
    src_dir = resolve_model_path(model_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    src = SourceModel(src_dir, dev, torch.float32 if dev.type == "cpu" else None)
    ignored = _check_shapes(src, m, opts)
    restore = Path(checkpoint_restore_path) if checkpoint_restore_path else None
    fingerprint = {"source": str(src_dir.resolve()), **asdict(opts)}
    if not m.needs_calibration:  # data-free: only the settings that shape the result matter
        fingerprint.update(num_samples=None, seq_len=None, calib_data=None)
    wins = None
    if opts.calib_data is not None:
        read_text_file(opts.calib_data)  # missing / empty data fails now, before any work
    if m.needs_calibration and restore is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src_dir)
        wins = calibration_windows(tok, opts.calib_data, num_samples, seq_len)

    times = {}
    t0 = time.perf_counter()
    if restore is not None:
        state = CalibState.load(restore, fingerprint)
    else:
        state = calibrate(src, m, opts, wins, _scale_dtype(opts, src), progress)
        if checkpoint_save_path:
            state.save(Path(checkpoint_save_path), fingerprint)
    times["calibration_s"] = time.perf_counter() - t0

    tmp = temp_dir_for(dst.resolve())
    try:
        t0 = time.perf_counter()
        write_export(src, state, m, get_writer(opts.format), opts, ignored, tmp, progress)
        times["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        limits = {"max_kl": max_kl, "max_ppl_ratio": max_ppl_ratio, "min_top1": min_top1}
        gate = run_gate(src_dir, tmp, m, eval_max_tokens, limits, device)
        times["eval_s"] = time.perf_counter() - t0
        report = {"status": "passed" if gate["passed"] else "failed", "method": m.name,
                  "format": opts.format, "source": str(src_dir), "options": asdict(opts),
                  "ignored": ignored, "restored_from": str(restore) if restore else None,
                  **gate, "time": times}  # fmt: skip
        (tmp / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if not gate["passed"]:
            (tmp / "QUANTIZATION_FAILED").write_text(
                "The quality gate failed: " + "; ".join(gate["reasons"]) + "\n"
            )
        publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    if not gate["passed"]:
        raise QualityGateError(f"export {dst} failed the quality gate: "
                               + "; ".join(gate["reasons"]))  # fmt: skip
    return report
