"""ONNX Runtime throughput of one quantized model relative to another, for ``autoquant``.

The one place ``analysis/`` reaches the exporter: a measured speed is what the export gives,
not something it is told. Both models are converted, exported to a temp folder and run in
alternation (median of several rounds, the same threads), so the ratio comes from one run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROUNDS = 7
RUNS_PER_ROUND = 5


def relative_speed(model: nn.Module, baseline: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                   *, rounds: int = ROUNDS) -> tuple[float | None, str | None]:
    """``(time of baseline / time of model, None)``: above 1 means ``model`` runs faster; or
    ``(None, why)`` where a model does not export."""
    import onnxruntime as ort

    import lowbit

    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for label, qm in (("result", model), ("first trial", baseline)):
            path = Path(tmp) / f"{label.replace(' ', '_')}.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lowbit.export_onnx(lowbit.convert(qm), path, example_inputs)
            except Exception as err:  # exporter limits are reported, not fatal to the search
                return None, f"speed: the {label} did not export to ONNX ({type(err).__name__}: " \
                             f"{err})"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            sessions.append(ort.InferenceSession(str(path), opts,
                                                 providers=["CPUExecutionProvider"]))
        feeds = [{i.name: x.detach().cpu().numpy() for i, x in zip(s.get_inputs(),
                                                                    example_inputs)}
                 for s in sessions]
        times: list[list[float]] = [[], []]
        for s, feed in zip(sessions, feeds):
            s.run(None, feed)  # warm-up
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                start = time.perf_counter()
                for _ in range(RUNS_PER_ROUND):
                    sessions[i].run(None, feeds[i])
                times[i].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0]), None
