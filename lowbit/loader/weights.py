"""Where a model's files are (local dir or hub id); its safetensors streamed one tensor at a time.

Never unpickles: only safetensors are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"


def resolve_model_path(model_path: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A local directory for `model_path`: the demo model for None, a local dir, or a hub id."""
    if model_path is None:
        return DEMO_MODEL
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model path {model_path} is a file; pass the model's directory")
    name = str(model_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"model path {model_path!r} does not exist (and is not a hub id like 'org/name')"
        )
    return _download(name, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch config, tokenizer and safetensors of a hub repo (or find them in the HF cache)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network errors, missing repos, gated repos — all end the same way
        raise FileNotFoundError(
            f"could not get model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Without network access, download it elsewhere (`huggingface-cli download {repo_id} "
            f"--local-dir DIR`) and pass --model-path DIR"
        ) from e


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from its index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt")
        )
        hint = (
            f" It has {pickled}: lowbit never unpickles checkpoints; convert them to safetensors"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights.{hint}")
    return files


def iterate_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor, str]]:
    """Yield (name, tensor, file name) for every tensor, one at a time, on the CPU."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, f.get_tensor(name), path.name
        except SafetensorError as e:
            raise ValueError(
                f"cannot read {path}: {e}. The file is damaged or truncated; download it again"
            ) from e


def total_bytes(files: list[Path]) -> int:
    """Size on disk of the weight files, for the progress bar."""
    return sum(p.stat().st_size for p in files)
