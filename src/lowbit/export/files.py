"""An export's three files as one set: stamping, checking and loading them.

``export_onnx`` writes ``model.onnx``, ``model.quant_params.json`` and
``model.weights.safetensors`` as one ``lowbit.io.FileSet``, and records each side file's
content hash in the ``.onnx`` (ONNX ``metadata_props`` key ``lowbit.files``). ``load_export``
(and ``lowbit report``) read a set only after checking those hashes, and refuse a set whose
files do not belong together, naming the one that does not.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.export.errors import ExportError
from lowbit.io import MissingFileError, reading, sha256_bytes

FILES_KEY = "lowbit.files"


class MismatchedFileSetError(ValueError):
    """The files of an export do not belong together (one was replaced or edited)."""


def side_paths(path: Path) -> tuple[Path, Path]:
    """``model.onnx`` → ``model.quant_params.json``, ``model.weights.safetensors``."""
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.quant_params.json"), path.with_name(f"{stem}.weights.safetensors")


def stamp_file_set(proto: Any, hashes: dict[str, str]) -> None:
    """Record the side files' content hashes in the ONNX model's ``metadata_props``."""
    for prop in list(proto.metadata_props):
        if prop.key == FILES_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = FILES_KEY, json.dumps(hashes, sort_keys=True)


def export_step_error(step: str, err: Exception) -> Exception:
    """``err`` raised during export ``step``, as the error the user should see: bad arguments
    keep their type, OS errors keep their errno, anything else becomes an ``ExportError``
    (one already raised, such as the exporters' own, passes through)."""
    if isinstance(err, (TypeError, ValueError, NotImplementedError, ExportError)):
        return err
    if isinstance(err, OSError):
        hint = ("; free some disk space and export again" if err.errno == errno.ENOSPC else
                "; check the folder's permissions" if err.errno in (errno.EACCES, errno.EPERM,
                                                                    errno.EROFS) else "")
        message = f"export step '{step}' failed: {err.strerror}{hint}"
        if err.filename is not None:
            return type(err)(err.errno, message, err.filename)
        return type(err)(err.errno, message)
    message = str(err)
    prefix = "torch.onnx.export failed: "
    if message.startswith(prefix):  # the exporter's own message, without our wrapper's words
        message = message[len(prefix):]
    return ExportError(f"export step '{step}' failed: {type(err.__cause__ or err).__name__}: "
                       f"{message}")


@dataclass
class ExportSet:
    """A checked export: paths, the quant params and the packed weights file's contents."""

    onnx_path: Path
    params_path: Path
    weights_path: Path
    quant_params: dict[str, Any]
    weights: dict[str, Any]  # tensor name → torch.Tensor (packed codes, scales, zero points)
    weights_metadata: dict[str, str]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f"{path}:{err.lineno}:{err.colno}" if isinstance(err, json.JSONDecodeError) \
            else str(path)
        raise ValueError(f"{where}: not a valid quant_params.json file ({err}); re-export "
                         "the model") from None
    if not isinstance(data, dict) or data.get("format") != "lowbit.quant_params":
        raise ValueError(f"{str(path)!r} is not a lowbit quant_params.json file")
    return data


def _recorded_hashes(onnx_path: Path) -> dict[str, str] | None:
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        raise ValueError(f"{str(onnx_path)!r} is not a readable ONNX file "
                         f"({type(err).__name__}: {err}); re-export the model") from None
    for prop in proto.metadata_props:
        if prop.key == FILES_KEY:
            try:
                hashes = json.loads(prop.value)
            except json.JSONDecodeError:
                raise ValueError(f"{str(onnx_path)!r}: its `{FILES_KEY}` metadata is not "
                                 "valid JSON; re-export the model") from None
            if not isinstance(hashes, dict):
                raise ValueError(f"{str(onnx_path)!r}: its `{FILES_KEY}` metadata must map "
                                 "file names to hashes")
            return hashes
    return None


def check_file_set(onnx_path: str | os.PathLike) -> None:
    """Raise ``MismatchedFileSetError`` naming the side file whose content is not the one the
    ``.onnx`` was exported with (``MissingFileError`` for a missing file)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise MissingFileError(f"ONNX file {str(onnx_path)!r} does not exist")
    hashes = _recorded_hashes(onnx_path)
    if hashes is None:
        warnings.warn(f"{onnx_path.name} records no hashes of its side files (exported by an "
                      "older lowbit): the set cannot be checked", stacklevel=3)
        return
    for side in side_paths(onnx_path):
        if not side.is_file():
            raise MissingFileError(f"{str(side)!r} is missing: {onnx_path.name} was exported "
                                   "with it; re-export the model")
        expected = hashes.get(side.name)
        actual = sha256_bytes(side.read_bytes())
        if expected != actual:
            raise MismatchedFileSetError(
                f"{side.name} does not belong to {onnx_path.name}: its content hash is "
                f"{actual[:19]}..., the .onnx was exported with {str(expected)[:19]}...; "
                "restore the matching file or re-export the model")


def load_export(path: str | os.PathLike) -> ExportSet:
    """Read an export (``model.onnx`` and its two side files), checked to be one set.

    Finishes an export interrupted in its last step first (see docs/reliability.md), then
    refuses a set whose files do not belong together with ``MismatchedFileSetError``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    onnx_path = Path(path)
    folder = onnx_path.parent if str(onnx_path.parent) else Path(".")
    if not folder.is_dir():
        raise MissingFileError(f"`path` {str(path)!r}: folder {str(folder)!r} does not exist")
    from safetensors import SafetensorError
    from safetensors.torch import load

    params_path, weights_path = side_paths(onnx_path)
    with reading(folder):
        check_file_set(onnx_path)
        params = _read_json(params_path)
        raw = weights_path.read_bytes()
    try:
        tensors = load(raw)
    except SafetensorError as err:
        raise ValueError(f"{str(weights_path)!r} is not a valid safetensors file ({err}); "
                         "re-export the model") from None
    # The header (u64 length + JSON) holds the metadata; safetensors has checked it above.
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = dict(header.get("__metadata__") or {})
    return ExportSet(onnx_path, params_path, weights_path, params, tensors, meta)


def read_quant_params(path: str | os.PathLike) -> dict[str, Any]:
    """A ``.quant_params.json`` file's contents, checked against its ``.onnx`` when that file
    sits beside it (``lowbit report``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist or is not a file")
    suffix = ".quant_params.json"
    if path.name.endswith(suffix):
        onnx_path = path.with_name(path.name[: -len(suffix)] + ".onnx")
        if onnx_path.is_file():
            return load_export(onnx_path).quant_params
    return _read_json(path)
