"""One tensor, one quantization per model call.

A quantizer that several layers share (q, k and v reading one hidden state; a block's input
read by its conv and its shortcut add, ``lowbit.share``) is called once per reader. Within one
call of the quantized model, a second call on the same tensor (the same object, unchanged
since: its version counter says so) returns the first result instead of observing, counting a
training step or fake-quantizing again. An EMA range then blends each tensor in once a batch
whatever the number of readers, ``quant_delay`` counts model steps, and the work is done once.
Outside a model call (a quantizer used on its own, a hook calling one) every call counts, as
before. Only observing and training quantizers use the memo: eval changes no state, and there
the first result is usually freed before the next reader asks. Results are held by weak
reference and forgotten when the call ends, so nothing stays alive longer than the readers
keep it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_local = threading.local()  # per thread: DataParallel replicas run their forwards in threads
_ATTACHED = "_lowbit_call_scope"


def recall(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What ``quantizer`` returned for ``x`` earlier in this model call, or None."""
    memo = getattr(_local, "memo", None)
    if memo is None:
        return None
    seen = memo.get(id(quantizer))
    if seen is None or seen[0]() is not x or seen[1] != x._version:
        return None
    return seen[2]()


def remember(quantizer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Note ``y`` as ``quantizer``'s result for ``x`` in this model call (if inside one)."""
    memo = getattr(_local, "memo", None)
    if memo is not None:
        memo[id(quantizer)] = (weakref.ref(x), x._version, weakref.ref(y))


def smoothed(x: torch.Tensor, factor: torch.Tensor,
             compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` (``x`` times a SmoothQuant ``factor``), or, in this model call, the tensor
    it gave the previous reader of the same ``x`` with an equal factor (q, k and v smooth
    their shared input by one ``s`` each, three new tensors a call): the shared input quantizer
    then sees one tensor and its memo above holds. One slot, held strongly until the next
    smoothed read or the end of the call (an observer passes its input through, so nothing else
    would keep the first reader's tensor alive for the second)."""
    memo = getattr(_local, "memo", None)
    if memo is None:
        return compute()
    seen = memo.get("smoothed")
    if (seen is not None and seen[0]() is x and seen[1] == x._version
            and (seen[2] is factor or torch.equal(seen[2], factor))):
        return seen[3]  # type: ignore[no-any-return]
    y = compute()
    memo["smoothed"] = (weakref.ref(x), x._version, factor, y)
    return y


def _enter(module: nn.Module, args: Any) -> None:
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    if depth == 0:  # the outermost quantized model: a fresh memo
        _local.memo = {}


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    _local.depth = max(getattr(_local, "depth", 1) - 1, 0)
    if _local.depth == 0:
        _local.memo = None


def attach(model: nn.Module) -> None:
    """Open a call scope around each call of ``model`` (once; it survives deepcopy and
    pickling: the hooks are module-level functions)."""
    if getattr(model, _ATTACHED, False):
        return
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_leave, always_call=True)  # also when forward raises
    setattr(model, _ATTACHED, True)
