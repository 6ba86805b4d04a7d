"""Text for calibration and evaluation: user files (text or jsonl) or built-in offline text.

The built-in text is Python's own standard-library source (code and long English docstrings), so
quantization and eval work with no network. Calibration and held-out eval use disjoint files.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

# Disjoint module lists: calibration never sees the held-out text.
CALIB_MODULES = ("argparse", "functools", "dataclasses", "typing", "enum", "calendar")
HELDOUT_MODULES = ("difflib", "fractions", "statistics", "textwrap")


def _stdlib_text(modules: tuple[str, ...]) -> str:
    """Concatenated source of the named standard-library modules that exist here."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        for cand in (root / f"{name}.py", root / name / "__init__.py"):
            if cand.is_file():
                parts.append(cand.read_text(encoding="utf-8", errors="replace"))
                break
    if not parts:
        raise FileNotFoundError(
            f"none of the standard-library files {list(modules)} exist under {root}; "
            f"pass a text file with --calib-data / --data"
        )
    return "\n\n".join(parts)


def builtin_calibration_text() -> str:
    """Built-in calibration text (standard-library sources)."""
    return _stdlib_text(CALIB_MODULES)


def builtin_heldout_text() -> str:
    """Built-in held-out eval text, disjoint from the calibration text."""
    return _stdlib_text(HELDOUT_MODULES)


def read_text_file(path: str | Path) -> list[str]:
    """Documents of a .txt file (one document) or a .jsonl file ({"text": ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{i} must be an object with a string 'text' field")
            docs.append(row["text"])
    else:
        docs = [raw]
    if not any(d.strip() for d in docs):
        raise ValueError(f"data file {path} is empty; give text (or jsonl with 'text' fields)")
    return docs


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """All documents tokenized and joined (EOS between documents when the tokenizer has one)."""
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in docs:
        if doc.strip():
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            ids.extend(sep)
    return ids


def windows(ids: list[int], seq_len: int, count: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `seq_len` tokens (the first `count` if given)."""
    out = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return out if count is None else out[:count]


def calibration_windows(
    tokenizer, path: str | Path | None, num_samples: int, seq_len: int
) -> list[list[int]]:
    """`num_samples` windows of `seq_len` tokens; a clear error when the data is too short."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    docs = read_text_file(path) if path is not None else [builtin_calibration_text()]
    ids = token_stream(tokenizer, docs)
    wins = windows(ids, seq_len, num_samples)
    if len(wins) < num_samples:
        src = path or "the built-in calibration text"
        raise ValueError(
            f"calibration data {src} has {len(ids)} tokens, too short for --num-samples "
            f"{num_samples} × --seq-len {seq_len} = {num_samples * seq_len}; give more text "
            f"or lower --num-samples / --seq-len"
        )
    return wins
