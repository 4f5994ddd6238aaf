"""Reductions over a ``torch.distributed`` process group, so every rank holds the same
quantization parameters.

When ``torch.distributed`` is initialised with more than one rank, observers and data-driven
initialisations reduce what they measure over the process group before using it: each rank
folds in the statistics of every rank's batch, so all ranks hold bit-identical ranges after every
step, and a run with per-rank batch B equals one process with batch W·B. Weights are the same on
every rank (DDP and FSDP keep them so), so weight statistics are never reduced.

By default each quantizer reduces its batch range as it quantizes (one small collective per
activation quantizer per step, so the range it uses includes this step's batch, as in Jacob et
al.). ``lag_ranges(model)`` trades that for one collective per step: quantizers use the range
as of the previous step and queue their batch range, and the model's next training forward
reduces the whole queue at once (docs/design.md, "Training on several processes").

The group is the default one unless ``lowbit.distributed.process_group(group)`` names another;
``lowbit.distributed.local()`` turns reductions off (rank-0-only calibration or evaluation while
a group is up). Every rank must run the same quantized model on the same number of batches: the
first training or calibration step compares a fingerprint of the model on every rank
(``check_same_model``) and names the difference.

This module imports nothing of lowbit but the errors it raises, so observers can import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_LOCAL = "local"
_NOT_SET = "default"
# The group reductions use: the default group, a ProcessGroup, or "local" (no reductions).
_chosen: ContextVar[Any] = ContextVar("lowbit_process_group", default=_NOT_SET)


class RankMismatchError(ValueError):
    """Ranks run different models, configs or numbers of batches."""


@contextmanager
def process_group(group: Any) -> Iterator[None]:
    """Reduce statistics over ``group`` (a ``torch.distributed`` ProcessGroup) inside."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("lowbit.distributed.process_group(group) needs torch.distributed to be "
                         "initialised (dist.init_process_group(...)) first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"`group` must be a torch.distributed.ProcessGroup, got "
                        f"{type(group).__name__}")
    token = _chosen.set(group)
    try:
        yield
    finally:
        _chosen.reset(token)


@contextmanager
def local() -> Iterator[None]:
    """No reductions inside: this rank calibrates or evaluates on its own (e.g. rank 0 only)."""
    token = _chosen.set(_LOCAL)
    try:
        yield
    finally:
        _chosen.reset(token)


def active_group() -> Any | None:
    """The group to reduce over now, or None: not initialised, one rank, ``local()``, or a
    trace / compile in progress (collectives are not part of an exported graph)."""
    chosen = _chosen.get()
    if chosen == _LOCAL or not dist.is_available() or not dist.is_initialized():
        return None
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    group = dist.group.WORLD if chosen == _NOT_SET else chosen
    return group if dist.get_world_size(group) > 1 else None


def world_size(group: Any) -> int:
    return dist.get_world_size(group)


def device_for(group: Any, like: torch.Tensor | None = None) -> torch.device:
    """Where a collective's buffer must live: NCCL wants CUDA, gloo takes either."""
    if like is not None:
        return like.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- reductions


def reduce_range(lo: torch.Tensor, hi: torch.Tensor, group: Any) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Elementwise min of ``lo`` and max of ``hi`` over the ranks, in one collective."""
    packed = torch.cat([-lo.reshape(-1), hi.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    n = lo.numel()
    return (-packed[:n]).reshape(lo.shape), packed[n:].reshape(hi.shape)


def reduce_max(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise max of ``t`` over the ranks."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def reduce_sum(tensors: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """Each tensor summed over the ranks (one collective per dtype)."""
    out: list[torch.Tensor] = list(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        packed = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        start = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = packed[start:start + n].reshape(tensors[i].shape)
            start += n
    return out


def reduce_mean(t: torch.Tensor, group: Any) -> torch.Tensor:
    """The mean of ``t`` over the ranks."""
    (total,) = reduce_sum([t], group)
    return total / world_size(group)


def global_mean(total: torch.Tensor, count: int, group: Any) -> torch.Tensor:
    """``Σ total / Σ count`` over the ranks: the mean over every rank's values."""
    n = torch.full((), float(count), dtype=torch.float64, device=total.device)
    summed, n = reduce_sum([total.double(), n], group)
    return (summed / n).to(total.dtype)


def gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    """Every rank's ``t`` in rank order; shapes may differ along dim 0 (same trailing dims)."""
    size = torch.tensor([t.shape[0] if t.dim() else 1], device=t.device, dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world_size(group))]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    if t.dim() == 0:
        parts = [torch.empty_like(t) for _ in lengths]
        dist.all_gather(parts, t.contiguous(), group=group)
        return parts
    longest = max(lengths)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded, group=group)
    return [p[:n] for p, n in zip(parts, lengths)]


def gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (tensors included), in rank order."""
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------- same model, same steps


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def model_fingerprint(model: nn.Module) -> list[tuple[str, str]]:
    """What must agree across ranks: each quantizer's place, role and spec, and every
    parameter's name and shape, as ``(where, what)`` pairs."""
    parts: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        spec = getattr(module, "spec", None)
        role = getattr(module, "role", None)
        if spec is not None and role is not None:
            parts.append((f"quantizer {name!r}", f"{role} {type(module).__name__} {spec!r}"))
    for name, p in model.named_parameters():
        parts.append((f"parameter {name!r}", f"shape {tuple(p.shape)}"))
    return parts


def check_same_model(model: nn.Module, group: Any, what: str = "the model") -> None:
    """Raise ``RankMismatchError`` on every rank unless all ranks hold the same quantized model
    and config (compared by a hash; one small all-gather, then one more to name the cause)."""
    parts = model_fingerprint(model)
    device = device_for(group, next(iter(model.parameters()), None))
    mine = torch.tensor([_digest(repr(parts)), len(parts)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(every, mine, group=group)
    if all(bool((e == every[0]).all()) for e in every):
        return
    # Name the first difference against rank 0 (the slow path runs once, on failure only).
    listed: list[Any] = [None] * world_size(group)
    dist.all_gather_object(listed, parts, group=group)
    first = listed[0]
    for rank, theirs in enumerate(listed):
        if theirs == first:
            continue
        for (where0, what0), (where_r, what_r) in zip(first, theirs):
            if (where0, what0) != (where_r, what_r):
                raise RankMismatchError(
                    f"ranks hold different quantized models, so their statistics cannot be "
                    f"reduced: rank 0 has {where0}: {what0}; rank {rank} has {where_r}: "
                    f"{what_r}. Build {what} with the same architecture and QuantConfig on "
                    "every rank")
        raise RankMismatchError(
            f"ranks hold different quantized models: rank 0 has {len(first)} quantizers and "
            f"parameters, rank {rank} has {len(theirs)}. Build {what} with the same "
            "architecture and QuantConfig on every rank")


def agree_on_next(has_batch: bool, group: Any, batch_index: int,
                  device: torch.device | None = None) -> bool:
    """Calibration: True while every rank has another batch, False once none has; a rank that
    runs out before the others is an error (the others would wait for it forever)."""
    flag = torch.tensor([int(has_batch)], dtype=torch.int64,
                        device=device or device_for(group))
    dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
    ranks_with = int(flag)
    if ranks_with in (0, world_size(group)):
        return bool(ranks_with)
    raise RankMismatchError(
        f"ranks hold different numbers of calibration batches: {ranks_with} of "
        f"{world_size(group)} ranks have a batch {batch_index} and the rest ran out. Give every "
        "rank the same number of batches (DistributedSampler(drop_last=True), or pass "
        "max_batches)")


def check_ready_before_sharding(model: nn.Module) -> None:
    """FSDP2 gathers parameters for each forward and drops what the forward wrote into them,
    so a learned step that initialises itself from its first batch (LSQ, PACT, {0, 1} binary
    activations) would silently restart from 1.0 every step: require it set before sharding."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return
    waiting = [f"{getattr(m, 'layer_name', '') or name!r} ({getattr(m, 'role', '?')})"
               for name, m in model.named_modules()
               if hasattr(m, "is_ready") and m._parameters and not m.is_ready()]
    if waiting:
        raise ValueError(
            f"{len(waiting)} learned quantizer(s) take their initial step from the first batch, "
            f"which FSDP2 does not keep (it re-gathers parameters each forward): {', '.join(waiting[:5])}. "
            "Run lowbit.calibrate(qm, a few batches) before fully_shard(qm), or set the "
            "initial value in the spec (e.g. QuantSpec.alpha_init for PACT)")


class FingerprintCheck:
    """Forward pre-hook on a quantized model: on its first training forward while ranks are
    reduced, check that every rank holds the same model and that nothing FSDP2 would lose is
    still to be initialised (picklable, so ``torch.save(model)`` and ``copy.deepcopy`` keep
    working)."""

    def __init__(self) -> None:
        self.checked = False

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.checked or not module.training:
            return
        group = active_group()
        if group is None:
            return
        check_same_model(module, group)
        check_ready_before_sharding(module)
        self.checked = True


def install_check(model: nn.Module) -> None:
    """Attach ``FingerprintCheck`` to ``model`` once."""
    if not any(isinstance(h, FingerprintCheck) for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(FingerprintCheck())


class LaggedRanges:
    """The queue of ``lag_ranges``: batch ranges pushed by quantizers during a training forward,
    reduced over the ranks in one collective and folded into their observers when the model's
    next training forward starts (a forward pre-hook). Pending ranges are local to this process:
    they are dropped, not saved, by ``copy.deepcopy`` and pickling."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor, Any]] = []

    def push(self, lo: torch.Tensor, hi: torch.Tensor, fold: Any) -> None:
        """Queue one batch range; ``fold(lo, hi, batches)`` applies it once reduced."""
        self.pending.append((lo.detach(), hi.detach(), fold))

    def __call__(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.flush()

    def flush(self) -> None:
        """Reduce every queued range over the ranks (one all-reduce) and fold each in."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        group = active_group()
        batches = 1 if group is None else world_size(group)
        sizes = [lo.numel() for lo, _, _ in pending]
        lo = torch.cat([lo.reshape(-1) for lo, _, _ in pending])
        hi = torch.cat([hi.reshape(-1) for _, hi, _ in pending])
        if group is not None:
            lo, hi = reduce_range(lo, hi, group)
        for (old_lo, old_hi, fold), new_lo, new_hi in zip(pending, lo.split(sizes),
                                                          hi.split(sizes)):
            fold(new_lo.reshape(old_lo.shape), new_hi.reshape(old_hi.shape), batches)

    def __getstate__(self) -> dict[str, Any]:
        return {"pending": []}


def lag_ranges(model: nn.Module) -> LaggedRanges:
    """One range reduction per training step instead of one per activation quantizer.

    Activation quantizers with a range observer (``ema``, ``minmax``) then fake-quantize each
    training batch with the range as of the previous step, and their batch ranges are reduced
    over the ranks together when the next training forward starts: every rank still holds the
    same ranges after every step, and 2 ranks x batch B still equal 1 process x batch 2B (one
    process lags the same way). The first batch of each quantizer sets its range at once; eval
    forwards, calibration and learned quantizers (LSQ, PACT, ...) are unchanged. A range pending
    when training stops (the last step's batch) is never folded in. Returns the queue (its
    ``flush()`` folds pending ranges in by hand). Idempotent."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    queue = next((h for h in model._forward_pre_hooks.values() if isinstance(h, LaggedRanges)),
                 None)
    if queue is None:
        queue = LaggedRanges()
        model.register_forward_pre_hook(queue)
    lagging = 0
    for module in model.modules():
        if getattr(module, "can_lag", False) and getattr(module, "shared", False):
            setattr(module, "lag", queue)  # noqa: B010 - an attribute, not a submodule
            lagging += 1
    if not lagging:
        raise ValueError("lag_ranges: the model has no activation quantizer with a range "
                         "observer ('ema' or 'minmax') to lag; pass a model from "
                         "lowbit.prepare_qat or lowbit.quantize")
    return queue
