"""``minilm.py``'s data and model plumbing: the fortunes sentence sets, tokenization, the
sentence embedding and its fidelity measures, the exported wrapper and what every variant
builder gets (``Ctx``) and returns (``Built``)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from minilm_setup import (  # noqa: E402
    FORTUNES,
    MAX_CHARS,
    MAX_LENGTH,
    MIN_CHARS,
    N_CALIB,
    N_EVAL,
    TOPK,
)
from torch import nn

# ------------------------------------------------------------------------------------- data


def fortune_entries(root: Path = FORTUNES) -> tuple[list[str], list[str]]:
    """All entries of the fortunes text files, whitespace-normalised; and the files read."""
    entries, files = [], []
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        files.append(path.name)
        lines: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip("\r") == "%":
                entries.append(" ".join(" ".join(lines).split()))
                lines = []
            else:
                lines.append(line)
        entries.append(" ".join(" ".join(lines).split()))
    return entries, files


def _shuffled_unique() -> tuple[list[str], list[str], list[str], list[str]]:
    """Every usable fortune once, shuffled with seed 0; and the entries, kept ones and files."""
    entries, files = fortune_entries()
    kept = [e for e in entries if MIN_CHARS <= len(e) <= MAX_CHARS]
    unique = list(dict.fromkeys(kept))
    random.Random(0).shuffle(unique)
    return unique, entries, kept, files


def extra_calibration_texts(n: int) -> list[str]:
    """``n`` more calibration sentences, after the evaluation and calibration sets (disjoint
    from both), for the variants whose algorithm wants more rows than the shared 200."""
    unique, _, _, _ = _shuffled_unique()
    return unique[N_EVAL + N_CALIB:N_EVAL + N_CALIB + n]


def sentence_sets(n_eval: int, n_calib: int) -> tuple[list[str], list[str], dict]:
    unique, entries, kept, files = _shuffled_unique()
    if len(unique) < N_EVAL + N_CALIB:
        raise SystemExit(f"minilm.py: only {len(unique)} usable fortunes in {FORTUNES}, need "
                         f"{N_EVAL + N_CALIB}")
    # the quick sets are prefixes of the full ones: the same sentences, fewer of them
    evals, calib = unique[:N_EVAL][:n_eval], unique[N_EVAL:N_EVAL + N_CALIB][:n_calib]

    def sha(texts: list[str]) -> str:
        return hashlib.sha256("\n".join(texts).encode()).hexdigest()

    info = {"source": str(FORTUNES), "files": files, "entries": len(entries),
            f"entries_{MIN_CHARS}_to_{MAX_CHARS}_chars": len(kept), "unique": len(unique),
            "eval": len(evals), "calibration": len(calib), "eval_sha256": sha(evals),
            "calibration_sha256": sha(calib),
            "recipe": "split on lines holding only '%', whitespace-normalised, "
                      f"{MIN_CHARS}-{MAX_CHARS} chars, deduplicated, random.Random(0).shuffle; "
                      f"eval = first {N_EVAL}, calibration = next {N_CALIB} (quick: prefixes)",
            "mean_chars_eval": float(np.mean([len(t) for t in evals]))}
    return evals, calib, info


def tokenize(tok: Any, texts: list[str], batch: int, **kw: Any) -> list[dict[str, torch.Tensor]]:
    return [dict(tok(texts[i:i + batch], truncation=True, max_length=MAX_LENGTH,
                     return_tensors="pt", **kw)) for i in range(0, len(texts), batch)]


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the attention mask, then L2 normalisation (sentence-transformers' recipe)."""
    m = mask[..., None].astype(np.float32)
    pooled = (hidden.astype(np.float32) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argpartition(-sim, k, axis=1)[:, :k]
    return idx


def fidelity(emb: np.ndarray, ref: np.ndarray, ref_nn: np.ndarray) -> dict:
    cos = (emb * ref).sum(1)
    nn_ = neighbours(emb, TOPK)
    overlap = [len(set(a) & set(b)) / TOPK for a, b in zip(nn_, ref_nn)]
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
            "p01_cos": float(np.quantile(cos, 0.01)), "top10_overlap": float(np.mean(overlap))}


# ------------------------------------------------------------------------------------ model


class LastHidden(nn.Module):
    """``forward(input_ids, attention_mask)`` → ``last_hidden_state``: what gets exported."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def dynamic_shapes() -> tuple[dict, dict]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    return {0: batch, 1: seq}, {0: batch, 1: seq}


@dataclass
class Ctx:
    """What every variant builder gets."""

    model: nn.Module
    tokenizer: Any
    calib_texts: list[str]
    calib_batches: list[dict[str, torch.Tensor]]  # tokenizer dicts, batch 32, ragged
    example: tuple[torch.Tensor, torch.Tensor]  # export example (first calibration batch)
    verify: list[tuple[torch.Tensor, torch.Tensor]]
    work: Path
    threads: int
    fp32_onnx: Path | None = None
    ort_pre: Path | None = None
    ort_pre_s: float = 0.0
    ort_preprocess: bool = True
    more_calib: int = 1000  # calibration sentences of the variants that take more than 200


@dataclass
class Built:
    """A runnable variant: ``kind`` "torch" (``module``) or "ort" (``path``), plus figures."""

    kind: str
    module: nn.Module | None = None
    path: Path | None = None
    info: dict = field(default_factory=dict)


def onnx_bytes(path: Path) -> int:
    """The .onnx file plus every external-data file it points to."""
    proto = onnx.load(str(path), load_external_data=False)
    extra = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in extra)


def torch_bytes(module: nn.Module, work: Path, name: str) -> int:
    path = work / f"{name}.pt"
    torch.save(module.state_dict(), path)
    return path.stat().st_size


def captured(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """Run ``fn`` with chatter kept out; return its result and the warnings' first lines."""
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    seen = dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                         if "torchvision" not in str(w.message))
    return result, list(seen)
