"""Local Hugging Face model directories for the command line, offline.

``lowbit quantize --model DIR`` takes a directory as ``save_pretrained`` writes it
(``config.json`` + weights, and a tokenizer): the model class its config names
(``architectures[0]``, else ``AutoModel``), loaded with ``local_files_only=True`` and
``HF_HUB_OFFLINE=1`` so nothing is downloaded; texts (one a line) tokenized by the directory's
own tokenizer; and a wrapper that takes the tokenizer's tensors positionally and returns one
tensor (``logits`` or ``last_hidden_state``), so the ONNX graph keeps the input names
``input_ids``, ``attention_mask``, ``token_type_ids`` and has plain tensor outputs.

transformers is imported here only, and only when a directory is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The first of these a model's output holds becomes the ONNX graph's output.
OUTPUT_FIELDS = ("logits", "last_hidden_state", "start_logits", "pooler_output")
# The tokenizer outputs the wrapper takes, in its forward's order.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def is_model_dir(ref: str | os.PathLike) -> bool:
    """True for a directory holding a Hugging Face ``config.json``."""
    path = Path(ref)
    return path.is_dir() and (path / "config.json").is_file()


class TensorOutputs(nn.Module):
    """Positional tensors in (``input_names``, a prefix-free subset of ``INPUT_NAMES`` in that
    order), one tensor out. Explicit parameters, not ``*args``: torch.export matches
    ``dynamic_shapes`` to the forward's parameters."""

    def __init__(self, model: nn.Module, input_names: list[str], output_field: str) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_field = output_field

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = [t for t in (input_ids, attention_mask, token_type_ids) if t is not None]
        out = self.model(**dict(zip(self.input_names, given)))
        return out[self.output_field]


@dataclass
class HFModel:
    """A loaded directory: the wrapped model, its tokenizer and what the export names."""

    model: TensorOutputs
    tokenizer: Any
    architecture: str  # the class that was loaded
    input_names: list[str]
    output_name: str


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model_dir(path: str | os.PathLike, *, max_length: int = 128) -> HFModel:
    """Load ``path`` (config, weights, tokenizer) offline and wrap it for export."""
    _offline()
    import transformers

    path = Path(path)
    if not is_model_dir(path):
        raise ValueError(f"--model directory {str(path)!r} has no config.json")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except OSError as err:
        raise ValueError(f"--model directory {str(path)!r}: cannot load weights: "
                         f"{str(err).splitlines()[0]}") from None
    model.eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model directory {str(path)!r} has no usable tokenizer "
                         f"({str(err).splitlines()[0]}); save one with "
                         "tokenizer.save_pretrained(DIR)") from None
    probe = tokenizer(["a"], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    input_names = [n for n in INPUT_NAMES if n in probe]
    if "input_ids" not in input_names:
        raise ValueError(f"--model directory {str(path)!r}: its tokenizer gives "
                         f"{', '.join(probe)}; lowbit reads text models with input_ids")
    with torch.no_grad():
        out = model(**{n: probe[n] for n in input_names})
    field = next((f for f in OUTPUT_FIELDS if isinstance(out.get(f), torch.Tensor)), None)
    if field is None:
        raise ValueError(f"--model {type(model).__name__} returns none of "
                         f"{', '.join(OUTPUT_FIELDS)}; wrap it in a module that returns a tensor")
    return HFModel(TensorOutputs(model, input_names, field).eval(), tokenizer,
                   type(model).__name__, input_names, field)


def read_texts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data file {str(path)!r} does not exist")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--data file {str(path)!r} holds no text lines")
    return texts


def text_batches(hf: HFModel, texts: list[str], batch_size: int,
                 max_length: int) -> list[tuple[torch.Tensor, ...]]:
    """Tokenized batches (padded to their longest text, truncated to ``max_length``), as
    tuples in ``hf.input_names`` order."""
    if max_length < 2:
        raise ValueError(f"--max-length must be an int >= 2, got {max_length}")
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = hf.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt")
        batches.append(tuple(enc[n] for n in hf.input_names))
    return batches


def export_example(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """An example batch for a dynamic-axes export: at least 2 rows and 2 tokens, since the
    dynamo exporter fixes axes of size 1."""
    if batch[0].shape[0] < 2:
        batch = tuple(torch.cat([t, t]) for t in batch)
    if batch[0].shape[1] < 2:
        batch = tuple(torch.cat([t, t], dim=1) for t in batch)
    return batch


def dynamic_shapes(hf: HFModel, max_length: int) -> tuple[dict[int, Any], ...]:
    """Dynamic batch and sequence axes on every input."""
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=max(max_length, 2))
    return tuple({0: batch, 1: seq} for _ in hf.input_names)
