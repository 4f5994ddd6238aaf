"""Jobs that tests/test_distributed.py runs on 2 CPU processes (gloo), one per rank.

``launch(job, world, out_dir, *args)`` spawns ``world`` processes that each join a gloo group
and run ``job(rank, world, *args)``; each rank's return value is saved and handed back in rank
order. The same jobs run in the test process with ``world=1`` and no group: the reference.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import conv_net
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.distributed import RankMismatchError

STEPS, BATCH = 6, 8  # training steps; samples per step over all ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, job: Any, world: int, port: int, out: str, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    try:
        result = job(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # The rank's work is done and saved: leave without interpreter teardown, where a gloo /
    # FSDP background thread destroyed late can abort the process ("terminate called without
    # an active exception", SIGABRT: seen once in ~20 runs of the FSDP checkpoint test).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(job: Any, world: int, out_dir: Path, *args: Any) -> list[Any]:
    mp.spawn(_entry, args=(job, world, free_port(), str(out_dir), args), nprocs=world)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_alone(job: Any, *args: Any) -> Any:
    """``job`` as rank 0 of 1, in this process, on one thread like the spawned ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return job(0, 1, *args)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- models, data


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def images(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps, BATCH, 1, 8, 8, generator=g), \
        torch.randint(0, 10, (steps, BATCH), generator=g)


def my_share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch (dim 0)."""
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def train(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, rank: int, world: int,
          after_step: Any = None) -> None:
    """SGD over the global batches ``x_all[step]``, this rank taking its share of each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, y = my_share(x_all[step], rank, world), my_share(y_all[step], rank, world)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


# -------------------------------------------------------------------------------------- jobs


def train_qat(rank: int, world: int, preset: str, reduce: bool = True,
              lag: bool = False) -> dict[str, Any]:
    """QAT of ``conv_net`` under DDP, per-rank batch BATCH / world, the same global batches;
    ``lag``: with ``lowbit.distributed.lag_ranges`` (and the range all-reduces counted)."""
    qm = lowbit.prepare_qat(conv_net(), QuantConfig.preset(preset), freeze_bn=0,
                            example_inputs=(torch.randn(2, 1, 8, 8),))
    calls: list[int] = []
    if lag:
        lowbit.distributed.lag_ranges(qm)
        all_reduce = dist.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return all_reduce(*args, **kwargs)

        lowbit.distributed.dist.all_reduce = counted  # type: ignore[assignment]
    sched = lowbit.schedules.for_model(qm, epochs=2)
    model: nn.Module = qm
    if world > 1:  # SLB's latent float weights lend only their shape: no gradient
        model = nn.parallel.DistributedDataParallel(qm, find_unused_parameters="slb" in preset)
    def schedule(step: int) -> None:
        sched.step_batch()
        if step == STEPS // 2 - 1:
            sched.step_epoch()

    per_step: list[int] = []

    def after(step: int) -> None:
        schedule(step)
        per_step.append(len(calls))
        calls.clear()

    try:
        with lowbit.distributed.local() if not reduce else _nothing():
            train(model, *images(), rank, world, after_step=after)
    finally:
        if lag:
            lowbit.distributed.dist.all_reduce = all_reduce  # type: ignore[assignment]
    return {"state": tensors(qm), "temperature": sched.current_temperature(),
            "steps": sched.step, "all_reduces": per_step}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


CALIBRATIONS: dict[str, QuantSpec] = {
    name: QuantSpec(bits=8, observer=name, symmetric=False)
    for name in ("minmax", "percentile", "kl", "mse")
}


def calibration_batches(rank: int, world: int) -> list[torch.Tensor]:
    """Eight batches; rank r holds batches r, r + world, ... (the order one process reads)."""
    g = torch.Generator().manual_seed(2)
    every = [torch.randn(4, 16, generator=g) * (1 + i) for i in range(8)]
    return every[rank::world]


def linear_config(weight: QuantSpec, input: QuantSpec | None = None) -> QuantConfig:
    return QuantConfig(rules=[LayerRule(types=["Linear"], weight=weight, input=input)])


def calibrate_observers(rank: int, world: int) -> dict[str, Any]:
    """Sharded PTQ calibration with each observer; qparams of every activation quantizer."""
    out: dict[str, Any] = {}
    for name, act in CALIBRATIONS.items():
        for granularity in ("per_tensor", "per_channel"):
            spec = QuantSpec(**{**act.to_dict(), "granularity": granularity}) \
                if granularity == "per_channel" else act
            cfg = linear_config(QuantSpec(bits=8), spec)
            qm = lowbit.quantize(mlp(), cfg)
            lowbit.calibrate(qm, calibration_batches(rank, world), progress=False)
            out[f"{name}/{granularity}"] = tensors(qm)
    return out


def calibrate_weight_algorithms(rank: int, world: int) -> dict[str, Any]:
    """Data-driven weights (SmoothQuant, GPTQ, AWQ, AdaRound), empirical bias correction and
    scale tuning."""
    out: dict[str, Any] = {}
    w4 = QuantSpec(bits=4, granularity="per_group", group_size=8, symmetric=True)
    configs = {
        "smoothing": linear_config(QuantSpec(bits=8), QuantSpec(bits=8, smoothing=0.5)),
        "gptq": linear_config(QuantSpec(**{**w4.to_dict(), "algorithm": "gptq"})),
        "awq": linear_config(QuantSpec(**{**w4.to_dict(), "algorithm": "awq"})),
        "adaround": linear_config(QuantSpec(bits=4, algorithm="adaround"), QuantSpec(bits=8)),
        "bias_correction": linear_config(QuantSpec(bits=4), QuantSpec(bits=8)),
    }
    for name, cfg in configs.items():
        qm = lowbit.quantize(mlp(), cfg)
        lowbit.calibrate(qm, calibration_batches(rank, world), progress=False,
                         bias_correction="empirical" if name == "bias_correction" else None)
        out[name] = tensors(qm)
    qm = lowbit.quantize(mlp(), linear_config(QuantSpec(bits=4), QuantSpec(bits=8)))
    batches = calibration_batches(rank, world)
    lowbit.calibrate(qm, batches, progress=False)
    lowbit.tune_scales(qm, mlp(), batches, steps=6, lr=1e-2, held_out=0, progress=False)
    out["scale_tuning"] = tensors(qm)  # gradients averaged: the ranks keep the same scales
    return out


def mismatches(rank: int, world: int) -> list[str]:
    """Set-ups that must fail on every rank with a message, not hang."""
    messages = []
    preset = "w8a8-qat" if rank == 0 else "w4a8-qat"  # rank 1 was given another config
    qm = lowbit.prepare_qat(mlp(), QuantConfig.preset(preset))
    try:
        qm(torch.randn(4, 16))
    except RankMismatchError as err:
        messages.append(f"train: {err}")
    qm = lowbit.quantize(mlp(), QuantConfig.preset("w8a8"))
    batches = calibration_batches(0, 1)[: 3 if rank == 0 else 2]  # uneven shards
    try:
        lowbit.calibrate(qm, batches, progress=False)
    except RankMismatchError as err:
        messages.append(f"calibrate: {err}")
    from torch.distributed.fsdp import fully_shard

    qm = fully_shard(lowbit.prepare_qat(mlp(), QuantConfig.preset("w4a8-lsq")))
    try:  # LSQ steps not yet set: FSDP2 would drop the first batch's init
        qm(torch.randn(4, 16))
    except ValueError as err:
        messages.append(f"fsdp: {err}")
    return messages


def train_mlp(rank: int, world: int, preset: str, sharding: str,
              dcp_dir: str | None = None) -> dict[str, Any]:
    """Calibrate, then QAT of ``mlp`` wrapped by ``sharding`` ("ddp", or "fsdp": FSDP2 on each
    Linear and the root); returns the full state dict (what rank 0 would save). With FSDP2
    and ``dcp_dir``, every rank also writes its shard with ``torch.distributed.checkpoint``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    qm = lowbit.prepare_qat(mlp(), QuantConfig.preset(preset))
    # Learned steps start from calibration, before the parameters are wrapped or sharded.
    # One global batch, split over the ranks (moving-average observers see one batch either way).
    lowbit.calibrate(qm, [my_share(calibration_batches(0, 1)[0], rank, world)], progress=False)
    qm.train()
    model: nn.Module = qm
    if world > 1 and sharding == "fsdp":
        for layer in qm:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(qm)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(qm)
    g = torch.Generator().manual_seed(3)
    train(model, torch.randn(STEPS, BATCH, 16, generator=g),
          torch.randint(0, 10, (STEPS, BATCH), generator=g), rank, world)
    if world > 1 and sharding == "fsdp":
        if dcp_dir is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save(get_model_state_dict(qm), checkpoint_id=dcp_dir)
        full = get_model_state_dict(qm, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
        return {k: v.detach().clone() for k, v in full.items()}
    return tensors(qm)
