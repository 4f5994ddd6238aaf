"""What does quantization-aware training cost per training step with lowbit, per method,
against FP32 and against torch.ao's ``prepare_qat``?

Run from the repository root::

    python benchmarks/qat_step_time.py              # ~4 min on 2 cores
    python benchmarks/qat_step_time.py --quick      # smoke run (a few steps, no targets)
    python benchmarks/qat_step_time.py --profile    # also profile FP32 / ste / lsq on the ResNet

Nets (batch 64, random inputs and labels, ``torch.set_num_threads(2)``):

* ``digits``: ``lowbit.demo.DigitsCNN`` on 1x8x8 inputs (~25k parameters);
* ``resnet``: the ResNet-8-style net of ``benchmarks/convnets.py`` on 3x32x32 inputs (stem
  conv3x3 + three basic blocks at 32/64/128 channels with 1x1 projection shortcuts: 9 convs and
  a Linear, 309k parameters).

A step is ``loss = CE(model(x), y) (+ 1e-4 * lowbit.quant_loss(qm))``, ``backward``, SGD
(momentum 0.9) ``step``, ``zero_grad`` (and ``schedule.step_batch()`` for lowbit): what the
user-facing QAT loop runs. Variants: FP32; lowbit ``prepare_qat(freeze_bn=None)`` with
``w8a8-qat`` (ste), ``w4a4-lsq``, ``w2a2-pact``, ``w2-dorefa``, ``w1a1-bnn``, ``w1a8-xnor``,
``w2a8-slb`` and ``w2-slb`` (SLB in its search phase, epoch 1 of the temperature schedule: the
soft expectation over the value set; the argmax phase after ``t_end_time`` is cheaper); and
torch.ao FX ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` (conv-BN(-ReLU)
fused and folded while training, like lowbit).

Timing: each variant is warmed up (``--warmup`` steps), then rounds visit every variant in turn
(rotating which goes first), timing ``--steps`` single steps each. Rounds during which other
processes kept >= 0.25 cores busy (``/proc/stat``) are left out and followed by a wait for
quiet, until ``--repeats`` clean rounds are in (at most ``--max-rounds``; if fewer are clean,
every round counts and the JSON says ``"contended": true``). A variant's figure is the median
of all its timed steps in the clean rounds (>= 200 by default); its ratio to FP32 is the median
of the per-round ratios of medians, so slow phases of the machine hit both sides of a ratio.

Targets (ResNet-style net): ste and lsq <= 1.3x FP32, SLB W2 <= 2.5x FP32. Prints a markdown
table and writes ``benchmarks/results/qat_step_time.json``; with ``--profile`` it also profiles
FP32, ste and lsq steps on the ResNet with ``torch.profiler`` (ops) and ``cProfile`` (Python
functions) and adds the breakdown to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from convnets import ResNet8  # noqa: E402
from harness import LoadMeter, cpu_info, wait_idle  # noqa: E402
from qat_digits import source_digest  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig  # noqa: E402
from lowbit.demo import DigitsCNN  # noqa: E402

RESULTS = HERE / "results" / "qat_step_time.json"
BATCH = 64
THREADS = 2
CLEAN_LOAD = 0.25
# glibc malloc keeping freed memory instead of returning it to the OS (see --no-trim-run)
NO_TRIM = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295"
VARIANTS = ("fp32", "ste w8a8-qat", "lsq w4a4-lsq", "pact w2a2-pact", "dorefa w2-dorefa",
            "bnn w1a1-bnn", "xnor w1a8-xnor", "slb w2a8-slb", "slb w2-slb", "torch.ao x86")
TARGETS = {"resnet": {"ste w8a8-qat": 1.3, "lsq w4a4-lsq": 1.3, "slb w2a8-slb": 2.5,
                      "slb w2-slb": 2.5}}
NETS = {"digits": (lambda: DigitsCNN(), (1, 8, 8)), "resnet": (lambda: ResNet8(), (3, 32, 32))}


# ------------------------------------------------------------------------------------ stepping


class Stepper:
    """One variant's model, optimizer, schedule and a fixed set of random batches."""

    def __init__(self, net: str, variant: str, seed: int = 0) -> None:
        factory, shape = NETS[net]
        torch.manual_seed(seed)
        model = factory()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # BN statistics that are not the init's (0, 1)
            model.train()
            for _ in range(4):
                model(torch.randn(BATCH, *shape, generator=gen))
        self.batches = [(torch.randn(BATCH, *shape, generator=gen),
                         torch.randint(0, 10, (BATCH,), generator=gen)) for _ in range(4)]
        self.schedule = None
        self.quant = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if variant == "fp32":
                self.model = model.train()
            elif variant == "torch.ao x86":
                from torch.ao.quantization import get_default_qat_qconfig_mapping
                from torch.ao.quantization.quantize_fx import prepare_qat_fx

                self.model = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"),
                                            (self.batches[0][0],)).train()
            else:
                preset = variant.split()[-1]
                self.model = lowbit.prepare_qat(model, QuantConfig.preset(preset), freeze_bn=None)
                self.schedule = lowbit.schedules.for_model(self.model, epochs=10)
                self.quant = True
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.i = 0

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = nn.functional.cross_entropy(self.model(x), y)
        if self.quant:
            loss = loss + 1e-4 * lowbit.quant_loss(self.model)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        if self.schedule is not None:
            self.schedule.step_batch()

    def timed(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.step()
            out.append(time.perf_counter() - t)
        return out


def measure(net: str, variants: list[str], *, warmup: int, steps: int, repeats: int,
            max_rounds: int, wait_s: float, say: Callable[[str], None]) -> dict:
    """``repeats`` clean rounds (others kept < CLEAN_LOAD cores busy), at most ``max_rounds``;
    a contended round is recorded but left out of the figures and followed by a wait for quiet.
    With fewer than ``repeats`` clean rounds every round counts and ``contended`` is set."""
    steppers = {v: Stepper(net, v) for v in variants}
    for s in steppers.values():
        s.timed(warmup)
    rounds: list[dict] = []
    for r in range(max_rounds):
        if sum(x["clean"] for x in rounds) >= repeats:
            break
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        meter = LoadMeter()
        meter.start()
        steps_s, faults = {}, {}
        for v in order:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            steps_s[v] = steppers[v].timed(steps)
            faults[v] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
        load = meter.stop()
        clean = load is not None and load < CLEAN_LOAD
        rounds.append({"load": load, "clean": clean, "steps_s": steps_s, "faults": faults})
        fp32 = 1000 * statistics.median(steps_s["fp32"])
        say(f"  {net} round {r + 1}: fp32 {fp32:.2f} ms, others' load "
            f"{'?' if load is None else f'{load:.2f}'} cores{'' if clean else ' (left out)'}")
        if not clean:
            wait_idle(wait_s, CLEAN_LOAD)
    used = [x for x in rounds if x["clean"]]
    contended = len(used) < repeats
    if contended:
        used = rounds
    out = {}
    for v in variants:
        times = [t for x in used for t in x["steps_s"][v]]
        ratios = [statistics.median(x["steps_s"][v]) / statistics.median(x["steps_s"]["fp32"])
                  for x in used]
        out[v] = {"median_ms": 1000 * statistics.median(times), "steps": len(times),
                  "ratio_to_fp32": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios),
                  "page_faults_per_step": statistics.median(x["faults"][v] for x in used),
                  "round_medians_ms": [1000 * statistics.median(x["steps_s"][v]) for x in used]}
    return {"variants": out, "rounds_run": len(rounds), "rounds_used": len(used),
            "contended": contended, "other_load_cores": [x["load"] for x in rounds],
            "clean_rounds": [x["clean"] for x in rounds]}


# ------------------------------------------------------------------------------------ profiling


def profile(variants: list[str], steps: int) -> dict:
    """torch.profiler op totals and cProfile lowbit function totals per variant (ResNet)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out: dict = {}
    for v in variants:
        s = Stepper("resnet", v)
        s.timed(10)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            s.timed(steps)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        top = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "calls_per_step": e.count / steps} for e in ops[:25]]
        prof_py = cProfile.Profile()
        prof_py.enable()
        s.timed(steps)
        prof_py.disable()
        st = pstats.Stats(prof_py)
        funcs = []
        for (file, line, name), (_cc, ncalls, tottime, cumtime, _callers) in st.stats.items():
            if "lowbit" in file or "torch/ao" in file or name in ("step", "backward"):
                funcs.append({"function": f"{Path(file).name}:{line}({name})",
                              "calls_per_step": ncalls / steps,
                              "tottime_ms_per_step": 1000 * tottime / steps,
                              "cumtime_ms_per_step": 1000 * cumtime / steps})
        funcs.sort(key=lambda f: -f["cumtime_ms_per_step"])
        out[v] = {"self_cpu_ms_per_step": total / 1000 / steps, "top_ops": top,
                  "python_functions": funcs[:30]}
    return out


def op_delta_table(prof: dict, base: str = "fp32") -> str:
    """Per-op self CPU ms/step of each profiled variant, with the difference to FP32."""
    variants = [v for v in prof if v != base]
    ops: dict[str, dict[str, float]] = {}
    for v, p in prof.items():
        for e in p["top_ops"]:
            ops.setdefault(e["op"], {})[v] = e["self_ms_per_step"]
    rank = sorted(ops, key=lambda o: -max(ops[o].get(v, 0) - ops[o].get(base, 0)
                                          for v in variants))
    head = f"| op | {base} ms | " + " | ".join(f"{v} ms (Δ)" for v in variants) + " |"
    lines = [head, "|---|--:|" + "--:|" * len(variants)]
    for o in rank[:18]:
        b = ops[o].get(base, 0.0)
        cells = [f"{ops[o].get(v, 0.0):.2f} ({ops[o].get(v, 0.0) - b:+.2f})" for v in variants]
        lines.append(f"| `{o}` | {b:.2f} | " + " | ".join(cells) + " |")
    totals = [f"{prof[v]['self_cpu_ms_per_step']:.2f}" for v in variants]
    lines.append(f"| **all ops (self CPU)** | {prof[base]['self_cpu_ms_per_step']:.2f} | "
                 + " | ".join(totals) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def format_table(results: dict) -> str:
    nets = list(results)
    head = "| variant | " + " | ".join(f"{n} ms/step | {n} x FP32 (min..max) | {n} faults/step"
                                      for n in nets) + " | target (resnet) | met? |"
    lines = [head, "|---|" + "--:|--:|--:|" * len(nets) + ":-:|:-:|"]
    for v in results[nets[0]]["variants"]:
        cells = []
        for n in nets:
            r = results[n]["variants"].get(v)
            cells.append("–" if r is None else f"{r['median_ms']:.2f}")
            cells.append("–" if r is None else
                         f"{r['ratio_to_fp32']:.2f}x ({r['ratio_min']:.2f}..{r['ratio_max']:.2f})")
            cells.append("–" if r is None else f"{r['page_faults_per_step']:.0f}")
        target = TARGETS["resnet"].get(v)
        met = "–"
        if target is not None and "resnet" in results:
            met = "pass" if results["resnet"]["variants"][v]["ratio_to_fp32"] <= target else "miss"
        lines.append(f"| {v} | " + " | ".join(cells) +
                     f" | {'–' if target is None else f'≤ {target}x'} | {met} |")
    return "\n".join(lines)


def verdicts_of(results: dict) -> dict:
    out = {}
    if "resnet" in results:
        for v, target in TARGETS["resnet"].items():
            if v in results["resnet"]["variants"]:
                ratio = results["resnet"]["variants"][v]["ratio_to_fp32"]
                out[v] = {"target_x": target, "ratio": ratio, "met": ratio <= target}
    return out


def no_trim_child(args: argparse.Namespace, variants: list[str]) -> dict:
    """The ResNet measurement (and profile) again in a child process whose glibc malloc keeps
    freed memory (``GLIBC_TUNABLES``): what is left without page-fault churn."""
    with tempfile.TemporaryDirectory(prefix="qat-step-") as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--nets", "resnet", "--variants",
               *variants, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--max-rounds", str(args.max_rounds),
               "--wait-idle", str(args.wait_idle), "--profile-steps", str(args.profile_steps),
               "--no-trim-run", "off", "--out", str(out)]
        if args.profile:
            cmd.append("--profile")
        env = os.environ | {"GLIBC_TUNABLES": NO_TRIM}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def print_profile(prof: dict) -> None:
    print("\nResNet-style net, torch.profiler self CPU time per step (top ops by excess "
          "over FP32):")
    print(op_delta_table(prof))
    for v in prof:
        if v == "fp32":
            continue
        print(f"\n{v}: lowbit Python functions (cProfile, cumulative ms per step)")
        for f in prof[v]["python_functions"][:12]:
            print(f"  {f['cumtime_ms_per_step']:7.2f} ms  {f['calls_per_step']:6.1f} calls  "
                  f"{f['function']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 5 steps")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--repeats", type=int, default=10, help="clean rounds over all variants")
    parser.add_argument("--max-rounds", type=int, default=40,
                        help="give up waiting for clean rounds after this many")
    parser.add_argument("--profile", action="store_true",
                        help="also profile fp32 / ste / lsq on the ResNet")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--no-trim-run", choices=("on", "off"), default="on",
                        help="also measure the ResNet in a child process with glibc malloc "
                        f"told to keep freed memory (GLIBC_TUNABLES={NO_TRIM})")
    parser.add_argument("--wait-idle", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats, args.profile_steps = 2, 5, 2, 3
        args.max_rounds, args.wait_idle = 2, 0
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    waited, load = wait_idle(args.wait_idle, CLEAN_LOAD)
    say(f"waited {waited:.0f} s for a quiet machine (others' load {load})")
    start = time.perf_counter()
    results = {net: measure(net, variants, warmup=args.warmup, steps=args.steps,
                            repeats=args.repeats, max_rounds=max(args.max_rounds, args.repeats),
                            wait_s=args.wait_idle, say=say) for net in args.nets}
    prof = None
    if args.profile:
        prof = profile([v for v in ("fp32", "ste w8a8-qat", "lsq w4a4-lsq") if v in variants],
                       args.profile_steps)
    child = None
    if args.no_trim_run == "on" and "resnet" in args.nets and not args.quick:
        say("ResNet again with glibc malloc keeping freed memory (child process) ...")
        child = no_trim_child(args, variants)
    total = time.perf_counter() - start

    loads = [x for r in results.values() for x, ok in zip(r["other_load_cores"], r["clean_rounds"])
             if x is not None and ok]
    result = {
        "question": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": " ".join(["python benchmarks/qat_step_time.py", *(argv or sys.argv[1:])]),
        "quick": args.quick, "wall_s": round(total, 1),
        "machine": cpu_info() | {"python": platform.python_version(), "torch": torch.__version__,
                                 "threads": THREADS, "lowbit_source_md5": source_digest(),
                                 "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")},
        "setup": {"batch": BATCH, "warmup": args.warmup, "steps_per_round": args.steps,
                  "rounds": args.repeats, "optimizer": "SGD lr 0.01 momentum 0.9",
                  "lowbit": "prepare_qat(freeze_bn=None) + schedules.for_model(epochs=10) "
                            "(epoch 1: SLB soft search); loss + 1e-4 * quant_loss",
                  "torch.ao": "prepare_qat_fx(get_default_qat_qconfig_mapping('x86'))",
                  "clean_load_below_cores": CLEAN_LOAD,
                  "max_other_load_cores_in_used_rounds": max(loads) if loads else None},
        "targets": verdicts_of(results),
        "results": results,
        "profile": prof,
        "no_trim": None if child is None else {
            "GLIBC_TUNABLES": NO_TRIM, "targets": child["targets"],
            "results": child["results"], "profile": child["profile"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def rounds_note(res: dict) -> str:
        return ", ".join(f"{n}: {r['rounds_used']} of {r['rounds_run']} rounds"
                         f"{' (CONTENDED: all rounds used)' if r['contended'] else ''}"
                         for n, r in res.items())

    print(f"QAT training step time, batch {BATCH}, {THREADS} threads; median of all steps of "
          f"the clean rounds ({args.steps} steps per variant per round; {rounds_note(results)}); "
          f"x FP32 = median of per-round ratios; faults = minor page faults per step")
    print(format_table(results))
    if prof is not None:
        print_profile(prof)
    if child is not None:
        print(f"\nResNet, glibc malloc keeping freed memory (GLIBC_TUNABLES={NO_TRIM}; "
              f"{rounds_note(child['results'])}):")
        print(format_table(child["results"]))
        if child["profile"] is not None:
            print_profile(child["profile"])
    print(f"\n{total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
