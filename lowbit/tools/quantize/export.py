"""Write an export: the source checkpoint's tensors with quantized linears in the chosen layout.

Everything goes into a temporary sibling directory that is renamed into place only when complete,
so an interrupted run never leaves an export that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from lowbit.loader.weights import iterate_tensors

SHARD_BYTES = 4 << 30
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "quantization_report.json",
               "hf_quant_config.json", "QUANTIZATION_FAILED"}  # fmt: skip


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dir_for(dst: Path) -> Path:
    """A fresh temporary directory next to `dst` (same filesystem, so rename is atomic).

    Leftovers of killed runs (`.DST.tmp-PID` whose process is gone) are removed first.
    """
    for old in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished export into place, replacing an older one (--overwrite) only now."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
    tmp.rename(dst)
    if old is not None:
        shutil.rmtree(old)


class ShardWriter:
    """Accumulates tensors and writes model-0000i-of-0000n.safetensors (+ index when sharded)."""

    def __init__(self, out: Path):
        self.out, self.shards, self.buf, self.size = out, [], {}, 0
        self.weight_map: dict[str, int] = {}

    def add(self, name: str, t: Tensor) -> None:
        """Queue one tensor; flush a shard when it is full."""
        if name in self.weight_map or name in self.buf:
            raise ValueError(f"export would write tensor {name!r} twice")
        nbytes = t.numel() * t.element_size()
        if self.buf and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.buf[name] = t.detach().cpu().contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        """Write the buffered tensors as the next shard (named when all are known)."""
        idx = len(self.shards)
        path = self.out / f"shard-{idx}.tmp"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.shards.append(path)
        self.weight_map.update(dict.fromkeys(self.buf, idx))
        self.buf, self.size = {}, 0

    def close(self) -> None:
        """Write the last shard, name the shards, and write the index when there are several."""
        if self.buf or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]  # fmt: skip
        for path, name in zip(self.shards, names):
            path.rename(self.out / name)
        if n > 1:
            index = {"metadata": {}, "weight_map": {k: names[i] for k, i in
                                                     sorted(self.weight_map.items())}}  # fmt: skip
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_export(src, state, method, writer, opts, ignored, out: Path, progress=True) -> None:
    """Write tensors, config.json (with quantization_config), side files and tokenizer to `out`."""
    shards = ShardWriter(out)
    dtype = src.checkpoint_dtype
    items = iterate_tensors(src.files)
    bar = tqdm(items, total=len(src.index), desc="Exporting", disable=not progress)
    for name, t, _file in bar:
        module, leaf = name.rsplit(".", 1)
        if module in state.results:
            if leaf == "weight":
                for suffix, qt in writer.linear_tensors(state.results[module], method, opts,
                                                        dtype).items():  # fmt: skip
                    shards.add(f"{module}.{suffix}", qt)
                continue
            if leaf == "bias" and opts.format == "awq":
                t = t.to(torch.float16)
        shards.add(name, state.overrides.get(name, t))
    shards.close()
    config = json.loads((src.dir / "config.json").read_text())
    config["quantization_config"] = writer.quantization_config(method, opts, ignored)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for fname, content in writer.extra_files(method, opts, ignored).items():
        (out / fname).write_text(json.dumps(content, indent=2) + "\n")
    for f in src.dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_FILES:
            shutil.copy2(f, out / f.name)
