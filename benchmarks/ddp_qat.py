"""What does quantization-aware training cost per step under DistributedDataParallel, and how
much of it is lowbit's reduction of activation ranges across ranks?

Run from the repository root::

    python benchmarks/ddp_qat.py                 # 1 and 2 processes, gloo on CPU (~3 min)
    python benchmarks/ddp_qat.py --quick         # smoke run
    python benchmarks/ddp_qat.py --device cuda   # NCCL, one GPU per process, where GPUs exist

Net: the ResNet-8-style net of ``benchmarks/convnets.py`` on random 3x32x32 inputs, batch
``--batch`` (64) per process, SGD with momentum, the user's loop: ``loss.backward()``,
``opt.step()``, ``schedule.step_batch()``. Each process runs ``cores // procs`` threads, so the
1- and 2-process runs use the same cores (weak scaling: 2 processes do twice the work).

Variants, timed in the same processes in rotating order (rounds), ``--steps`` steps each per
round after ``--warmup`` untimed ones: ``fp32`` (the float net under DDP); lowbit
``prepare_qat`` with the shipped preset (``w8a8-qat`` by default; ``--preset``) as a user runs
it, whose activation observers reduce their batch ranges over the ranks every step
(``lowbit.distributed``); the same with ``lowbit.distributed.lag_ranges`` (one reduction per
step, of the previous step's ranges); and the same with reductions off (``lowbit.distributed.local()``:
ranks drift apart, so it is only a yardstick). The reduction's cost is the time spent inside
lowbit's collectives per step (waiting for the other ranks included), timed around each call,
as a share of the step (target <= 5%); the difference to the unreduced run says the same with
more noise. Figures are medians over
every timed step of rank 0; the table gives the load other processes put on the machine.
Prints a markdown table and writes ``benchmarks/results/ddp_qat.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convnets  # noqa: E402
import harness  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig  # noqa: E402

VARIANTS = ("fp32", "lowbit", "lowbit-lagged", "lowbit-local")
REDUCING = ("lowbit", "lowbit-lagged")


def build(variant: str, preset: str, device: torch.device) -> tuple[nn.Module, Any]:
    model, _ = convnets.build("resnet8", seed=0)
    if variant == "fp32":
        return model.train().to(device), None
    qm = lowbit.prepare_qat(model, QuantConfig.preset(preset),
                            example_inputs=(torch.randn(2, 3, 32, 32),)).to(device)
    if variant == "lowbit-lagged":
        lowbit.distributed.lag_ranges(qm)
    return qm, lowbit.schedules.for_model(qm, epochs=1)


def worker(rank: int, procs: int, args: argparse.Namespace, port: int, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // procs))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if procs > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank,
                                world_size=procs, timeout=timedelta(minutes=10))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    runs = {}
    for variant in VARIANTS:
        model, sched = build(variant, args.preset, device)
        wrapped = nn.parallel.DistributedDataParallel(model) if procs > 1 else model
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9)
        runs[variant] = (wrapped, opt, sched)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def step(variant: str) -> None:
        model, opt, sched = runs[variant]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step_batch()

    def timed(variant: str, n: int, keep: bool) -> None:
        context = lowbit.distributed.local() if variant == "lowbit-local" else _Nothing()
        with context:
            for _ in range(n):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(variant)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                if keep:
                    times[variant].append(1000 * (time.perf_counter() - start))

    for variant in VARIANTS:
        timed(variant, args.warmup, keep=False)
    in_reductions = account_reductions()
    meter, loads = harness.LoadMeter(), []
    reduction_ms: dict[str, list[float]] = {v: [] for v in REDUCING}
    for r in range(args.rounds):
        meter.start()
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            before = in_reductions[0]
            timed(variant, args.steps, keep=True)
            if variant in REDUCING:
                reduction_ms[variant].append(1000 * (in_reductions[0] - before) / args.steps)
        loads.append(meter.stop())
    if procs > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        result = {v: statistics.median(t) for v, t in times.items()}
        result["load"] = [v for v in loads if v is not None]
        result["in_reductions"] = statistics.median(reduction_ms["lowbit"])
        result["in_reductions_lagged"] = statistics.median(reduction_ms["lowbit-lagged"])
        Path(out).write_text(json.dumps(result))


def account_reductions() -> list[float]:
    """Time spent in lowbit's collectives (``lowbit.distributed``'s reductions, waiting for
    the other ranks included), accumulated into the returned one-element list."""
    total = [0.0]
    for name in ("reduce_range", "reduce_sum", "reduce_max", "gather"):
        inner = getattr(lowbit.distributed, name)

        def timed(*args: Any, _inner: Any = inner) -> Any:
            start = time.perf_counter()
            try:
                return _inner(*args)
            finally:
                total[0] += time.perf_counter() - start
        setattr(lowbit.distributed, name, timed)
    return total


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def measure(procs: int, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).with_suffix(f".{procs}.tmp")
    mp.spawn(worker, args=(procs, args, _free_port(), str(out)), nprocs=procs)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table(results: dict[int, dict[str, Any]], preset: str) -> str:
    lines = [f"| processes | FP32 step ms | lowbit {preset} ms | x FP32 | in range reductions ms "
             "(share of step) | `lag_ranges` ms | in its reductions ms (share) | ranges not "
             "reduced ms | load besides rank 0 (cores) |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def share(ms: float, step: float) -> str:
        return f"{ms:.1f} ({100 * ms / step:.1f}%)" if procs > 1 else "–"

    for procs, r in results.items():
        load = f"{statistics.mean(r['load']):.2f}" if r["load"] else "?"
        local = f"{r['lowbit-local']:.1f}" if procs > 1 else "–"
        lines.append(f"| {procs} | {r['fp32']:.1f} | {r['lowbit']:.1f} | "
                     f"{r['lowbit'] / r['fp32']:.2f} | {share(r['in_reductions'], r['lowbit'])} | "
                     f"{r['lowbit-lagged']:.1f} | "
                     f"{share(r['in_reductions_lagged'], r['lowbit-lagged'])} | {local} | {load} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="w8a8-qat")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64, help="samples per process and step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    ap.add_argument("--out", default="benchmarks/results/ddp_qat.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 3, 2, 1
    if args.device == "cuda" and torch.cuda.device_count() < max(args.procs):
        ap.error(f"--device cuda needs {max(args.procs)} GPUs, found {torch.cuda.device_count()}")
    machine = harness.cpu_info()
    results = {procs: measure(procs, args) for procs in args.procs}
    text = table(results, args.preset)
    print(harness.machine_line(machine))
    print(f"ResNet-8-style, batch {args.batch} per process, {args.device}, "
          f"{'NCCL' if args.device == 'cuda' else 'gloo'}; median of {args.rounds} x "
          f"{args.steps} steps\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": machine, "preset": args.preset, "batch": args.batch, "device": args.device,
        "command": "python benchmarks/ddp_qat.py " + " ".join(argv or sys.argv[1:]),
        "results": {str(k): v for k, v in results.items()}, "table": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
