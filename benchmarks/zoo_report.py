"""The zoo sweep's outputs: the markdown table, and merging partial runs into one result."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from zoo_models import MODELS
from zoo_more_models import MORE

PRESET_ORDER = ("w8a8", "w8a8-transformer", "w8", "w4-g128")

HEADER = ("| model | family | preset | export | quant / float / BN folded / BN left | silently "
          "float | codes identical (end to end / fed ORT's codes) | cosine | size | int / float "
          "kernels | speed b1 | speed b8 | ORT's int8: b1 / b8 (cosine) | fails |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _num(v: Any, fmt: str, none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def format_row(r: dict[str, Any]) -> str:
    fails = [k for k, v in r.get("targets", {}).items() if v is False]
    counts = ("–" if "quantized" not in r else
              f"{r['quantized']} / {r['float']} / {r['folded_bn']} / {r['bn_left']}")
    silent = "–" if "silently_float" not in r else str(len(r["silently_float"]))
    kernels = r.get("kernels")
    export = r["export"] if r["export"].startswith("ok") or not r["export"] else r["export"][:90]
    if r.get("stage") in ("ort", "speed"):
        export += f" ({r['stage']}: {r['error'][:80]})"
    if r.get("float_export") not in (None, "dynamic", "static", "not exported"):
        export += " (FP32 export fails too)"
    return (f"| {r['model']} | {r['family']} | {r['preset']} | {export} | {counts} | {silent} | "
            f"{_codes(r)} | {_num(r.get('cosine'), '.4f')}{_floor(r)} | "
            f"{_num(r.get('size_ratio'), '.2f')}{'x' if r.get('size_ratio') else ''} | "
            f"{'–' if not kernels else str(kernels['int']) + ' / ' + str(kernels['float'])} | "
            f"{_num(r.get('speed_b1'), '.2f')} | {_num(r.get('speed_b8'), '.2f')} | "
            f"{_ort_int8(r)} | {', '.join(fails) or 'pass'} |")


def _codes(r: dict[str, Any]) -> str:
    """Identical codes end to end, and with every layer fed ONNX Runtime's own input codes."""
    codes, local = r.get("codes_identical"), r.get("local_identical")
    if codes is None:
        return "–"
    return f"{100 * codes:.2f}%" + ("" if local is None else f" / {100 * local:.4f}%")


def _ort_int8(r: dict[str, Any]) -> str:
    """ONNX Runtime's own int8 file of the same FP32 export, x FP32 in the same timing run."""
    if "ort_int8_speed_b1" not in r:
        return "–"
    cos = r.get("ort_int8_cosine")
    return (f"{r['ort_int8_speed_b1']:.2f} / {r['ort_int8_speed_b8']:.2f}"
            f"{'' if cos is None else f' ({cos:.4f})'}")


def _floor(r: dict[str, Any]) -> str:
    """The rounding-noise floor next to a cosine that misses the target (``zoo.rounding_floor``,
    median and range of the noise draws): where the floor is lower still, no 8-bit rounding
    reaches the target on that model."""
    floor, cos = r.get("rounding_floor"), r.get("cosine")
    if floor is None or cos is None or r.get("targets", {}).get("cosine") is not False:
        return ""
    spread = r.get("rounding_floor_range")
    return f" (floor {floor:.2f}" + ("" if not spread else
                                     f", {spread[0]:.2f}-{spread[1]:.2f}") + ")"


def format_table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def lowbit_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """One result from several partial runs: rows in model-list order, each (model, preset)
    from the first file that has it; the runs' commands and dates are kept."""
    runs = [json.loads(p.read_text()) for p in parts]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for r in run["rows"]:
            rows.setdefault((r["model"], r["preset"]), r)
    order = {m.name: i for i, m in enumerate(MODELS + MORE)}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["model"], len(order)),
                                                  PRESET_ORDER.index(r["preset"])))
    result = {**runs[0], "command": [r["command"] for r in runs],
              "date": [r["date"] for r in runs], "complete": all(r["complete"] for r in runs),
              "seconds": sum(r["seconds"] for r in runs), "rows": merged,
              "summary": {"rows": len(merged), "pass": sum(r["pass"] for r in merged),
                          "exports": sum(r["export"].startswith("ok") for r in merged)}}
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(format_table(merged))
    print(f"\n{result['summary']['pass']}/{len(merged)} rows meet every target; "
          f"{result['summary']['exports']} export; wrote {out}")
    return result
