"""``minilm.py``'s variants: one builder per row (references, ORT's quantizers, lowbit's
presets and recipes), each ``Ctx -> Built``, collected in ``VARIANTS``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from minilm_data import (
    Built,
    Ctx,
    LastHidden,
    captured,
    dynamic_shapes,
    extra_calibration_texts,
    tokenize,
    torch_bytes,
)
from minilm_setup import BATCH, MAX_LENGTH, ORT_CALIB_BATCH
from qat_digits import quiet
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec

# ------------------------------------------------------------------------- reference variants


def build_torch_fp32(ctx: Ctx) -> Built:
    module = LastHidden(ctx.model).eval()
    return Built("torch", module=module,
                 info={"bytes": torch_bytes(ctx.model, ctx.work, "torch_fp32"),
                       "bytes_of": "torch.save(state_dict)", "quantize_s": 0.0})


def build_ort_fp32(ctx: Ctx) -> Built:
    path = ctx.work / "minilm_fp32.onnx"
    start = time.perf_counter()
    with quiet():
        program = torch.onnx.export(LastHidden(ctx.model).eval(), ctx.example, dynamo=True,
                                    dynamic_shapes=dynamic_shapes(), opset_version=19,
                                    input_names=["input_ids", "attention_mask"],
                                    output_names=["last_hidden_state"])
        program.save(str(path))
    export_s = time.perf_counter() - start
    ctx.fp32_onnx = path
    return Built("ort", path=path, info={"export_s": export_s, "quantize_s": 0.0,
                                         "exporter": "torch.onnx.export(dynamo=True), opset 19"})


# ----------------------------------------------------------------------------------- anchors


def build_torch_dynamic(ctx: Ctx) -> Built:
    from torch.ao.quantization import quantize_dynamic

    start = time.perf_counter()
    qmodel, caught = captured(quantize_dynamic, copy.deepcopy(ctx.model), {nn.Linear},
                              dtype=torch.qint8)
    seconds = time.perf_counter() - start
    return Built("torch", module=LastHidden(qmodel).eval(),
                 info={"quantize_s": seconds, "warnings": caught,
                       "bytes": torch_bytes(qmodel, ctx.work, "torch_dynamic"),
                       "bytes_of": "torch.save(state_dict)",
                       "recipe": "torch.ao.quantization.quantize_dynamic({nn.Linear}, qint8), "
                                 f"engine {torch.backends.quantized.engine}"})


def ort_input(ctx: Ctx) -> Path:
    """The FP32 file ORT's quantizers read: pre-processed once (shared by the ORT anchors)."""
    assert ctx.fp32_onnx is not None, "ORT FP32 must be built first"
    if not ctx.ort_preprocess:
        return ctx.fp32_onnx
    if ctx.ort_pre is None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = ctx.work / "minilm_fp32_pre.onnx"
        start = time.perf_counter()
        captured(quant_pre_process, str(ctx.fp32_onnx), str(pre), skip_symbolic_shape=True)
        ctx.ort_pre_s, ctx.ort_pre = time.perf_counter() - start, pre
    return ctx.ort_pre


def build_ort_dynamic(ctx: Ctx) -> Built:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = ort_input(ctx)
    path = ctx.work / "minilm_ort_dynamic.onnx"
    start = time.perf_counter()
    _, caught = captured(quantize_dynamic, str(src), str(path), per_channel=True,
                         weight_type=QuantType.QInt8)
    return Built("ort", path=path, info={
        "quantize_s": time.perf_counter() - start + ctx.ort_pre_s,
        "preprocess_s": ctx.ort_pre_s, "warnings": caught,
        "recipe": "onnxruntime.quantization.quantize_dynamic(per_channel=True, QInt8 weights)"})


def ort_calibration(ctx: Ctx, model_path: Path) -> tuple[Any, dict]:
    """A CalibrationDataReader over the calibration sentences, all padded to one shape."""
    from onnxruntime.quantization import CalibrationDataReader

    names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    fixed = max(len(ids) for ids in ctx.tokenizer(ctx.calib_texts, truncation=True,
                                                   max_length=MAX_LENGTH)["input_ids"])
    size = ORT_CALIB_BATCH if len(ctx.calib_texts) % ORT_CALIB_BATCH == 0 else 1
    batches = []
    for i in range(0, len(ctx.calib_texts), size):
        enc = ctx.tokenizer(ctx.calib_texts[i:i + size], truncation=True, max_length=fixed,
                            padding="max_length", return_tensors="np")
        batches.append({n: enc[n].astype(np.int64) for n in names})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.items, None)

        def rewind(self) -> None:
            self.items = iter(batches)

    return Reader(), {"ort_calibration": f"{len(ctx.calib_texts)} sentences padded to {fixed} "
                                         f"tokens, batches of {size}, inputs {names}"}


def _ort_static(ctx: Ctx, name: str, recipe: str, **kw: Any) -> Built:
    from onnxruntime.quantization import quantize_static

    src = ort_input(ctx)
    path = ctx.work / f"minilm_{name}.onnx"
    reader, calib_info = ort_calibration(ctx, src)
    start = time.perf_counter()
    _, caught = captured(quantize_static, str(src), str(path), reader, **kw)
    return Built("ort", path=path, info={
        "quantize_s": time.perf_counter() - start + ctx.ort_pre_s,
        "preprocess_s": ctx.ort_pre_s, "warnings": caught, "recipe": recipe, **calib_info})


def build_ort_static_qdq(ctx: Ctx) -> Built:
    from onnxruntime.quantization import QuantFormat

    return _ort_static(ctx, "ort_static_qdq", "quantize_static(quant_format=QDQ), defaults "
                       "otherwise (MinMax, QInt8 activations and weights, per-tensor)",
                       quant_format=QuantFormat.QDQ)


def build_ort_static_matmul(ctx: Ctx) -> Built:
    from onnxruntime.quantization import QuantFormat, QuantType

    return _ort_static(ctx, "ort_static_matmul", "quantize_static(QDQ, op_types_to_quantize="
                       "['MatMul'], QUInt8 activations, QInt8 per-channel weights, MinMax)",
                       quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                       activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                       per_channel=True)


def build_ort_int4(ctx: Ctx) -> Built:
    """ORT's own 4-bit weight-only quantizer: ``MatMulNBitsQuantizer`` (round to nearest,
    asymmetric blocks of 128 along the input, as ``w4-g128``) on the FP32 file's MatMuls; the
    embedding tables stay FP32 (it quantizes MatMul/Gather only where told to)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    assert ctx.fp32_onnx is not None, "ORT FP32 must be built first"
    path = ctx.work / "minilm_ort_int4_g128.onnx"
    start = time.perf_counter()
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(ctx.fp32_onnx)), algo_config=config)
    _, caught = captured(quantizer.process)
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    return Built("ort", path=path, info={
        "quantize_s": time.perf_counter() - start, "warnings": caught,
        "recipe": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer("
                  "DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False)), RTN"})


# ------------------------------------------------------------------------------------ lowbit

# weight methods whose ranges come from the weights alone (calibration data changes nothing)
DATA_FREE_METHODS = {"ste", "lsq", "pact", "dorefa", "binary", "slb"}


def calibration_needed(qm: nn.Module, cfg: QuantConfig) -> bool:
    """True unless every activation quantizer is dynamic and no layer's weights depend on data
    (SmoothQuant, GPTQ, AWQ): then ``lowbit.calibrate`` would run its forwards and change
    nothing."""
    from lowbit.calibrate import activation_quantizers
    from lowbit.quantizers import Quantizer

    if any(not q.spec.dynamic for q in activation_quantizers(qm)):
        return True
    with contextlib.suppress(ImportError):  # lowbit >= the SmoothQuant/GPTQ/AWQ commit
        from lowbit.weight_calibration import layers_needing_data

        return bool(layers_needing_data(qm))
    if any(m.spec.method not in DATA_FREE_METHODS for m in qm.modules()
           if isinstance(m, Quantizer)):
        return True
    text = json.dumps(cfg.to_dict(), default=str).lower()
    return any(word in text for word in ("gptq", "awq", "smooth"))  # data-driven passes


class NotAvailable(Exception):
    """The preset is not known to this lowbit."""


def lowbit_flow(ctx: Ctx, preset: str, config: QuantConfig | None = None,
                info: dict | None = None,
                after_calibrate: Callable[[nn.Module, dict], None] | None = None) -> Built:
    """The public flow: quantize → calibrate (→ ``after_calibrate(qm, info)``, e.g.
    ``lowbit.tune_scales``) → convert → export_onnx."""
    try:
        cfg = config or QuantConfig.preset(preset)
    except (ValueError, KeyError) as err:
        raise NotAvailable(str(err)) from err
    info = {"preset": preset, "warnings": [], **(info or {})}
    start = time.perf_counter()
    qm, caught = captured(lowbit.quantize, copy.deepcopy(ctx.model), cfg)
    info["warnings"] += caught
    info["quantize_only_s"] = time.perf_counter() - start
    if calibration_needed(qm, cfg):
        t = time.perf_counter()
        try:
            _, caught = captured(lowbit.calibrate, qm, ctx.calib_batches, progress=False)
            info["warnings"] += caught
            info["calibrate_s"] = time.perf_counter() - t
            info["calibrated_sentences"] = len(ctx.calib_texts)
        except ValueError as err:  # a future calibrate may refuse a model with nothing to do
            if "calibrat" not in str(err).lower() or "nothing" not in str(err).lower():
                raise
            info["calibrate_skipped"] = str(err)
    else:
        info["calibrate_skipped"] = ("no static activation quantizer and data-free weight "
                                     "methods only: nothing to calibrate")
    if after_calibrate is not None:
        t = time.perf_counter()
        after_calibrate(qm, info)
        info["after_calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dm = lowbit.convert(qm)
    info["convert_s"] = time.perf_counter() - t
    info["quantize_s"] = time.perf_counter() - start
    del qm
    plan = getattr(dm, "lowbit_plan", None)
    float_layers = dict(plan.float_layers) if plan is not None else {}
    path = ctx.work / f"minilm_lowbit_{preset}.onnx"
    t = time.perf_counter()
    report, caught = captured(lowbit.export_onnx, LastHidden(dm).eval(), path, ctx.example,
                              dynamic_shapes=dynamic_shapes(), verify_inputs=ctx.verify,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], float_layers=float_layers,
                              threads=ctx.threads)
    info["export_s"] = time.perf_counter() - t
    info["warnings"] += caught
    p = report.parity
    info["export"] = {
        "opset": report.opset, "weight_storage": report.weight_storage,
        "float_layers": float_layers,
        "side_files_bytes": {report.params_path.name: report.params_path.stat().st_size,
                             report.weights_path.name: report.weights_path.stat().st_size},
        "parity": {"codes_identical": p.codes_identical, "codes_total": p.codes_total,
                   "codes_max_diff": p.codes_max_diff, "output_max_abs": p.output_max_abs,
                   "output_max_lsb": p.output_max_lsb, "lsb_unit": p.lsb_unit,
                   "worst_layers": p.worst_layers, "unmatched": p.unmatched},
        "parity_inputs": "export example (calibration batch 1) + calibration batch 2",
    }
    del dm
    return Built("ort", path=path, info=info)


def lowbit_preset(preset: str) -> Callable[[Ctx], Built]:
    return lambda ctx: lowbit_flow(ctx, preset)


def lowbit_w4_adaround(ctx: Ctx) -> Built:
    """``w4-g128`` with AdaRound's learned rounding on every Linear (its defaults: 500 Adam
    steps a layer on 256 input rows each; the rows of the 200 calibration sentences)."""
    import dataclasses

    cfg = QuantConfig.preset("w4-g128")
    rules = [dataclasses.replace(r, weight=dataclasses.replace(r.weight, algorithm="adaround"))
             if r.weight is not None and r.weight.granularity == "per_group" else r
             for r in cfg.rules]
    return lowbit_flow(ctx, "w4-g128-adaround", config=QuantConfig(rules=rules),
                       info={"recipe": "preset w4-g128, Linear weights algorithm='adaround' "
                                       "(AdaRoundOptions defaults)"})


def lowbit_mixed(ctx: Ctx) -> Built:
    """``w8a8-transformer`` with the layers ``keep_sensitive_layers`` keeps in float: searched
    on the calibration sentences only (mean-pooled embedding cosine >= 0.9995, at most 6)."""
    start = time.perf_counter()
    found, _ = captured(lowbit.keep_sensitive_layers, ctx.model,
                        QuantConfig.preset("w8a8-transformer"), ctx.calib_batches,
                        target=0.9995, max_layers=6, output=pooled_output)
    info = {"search_s": time.perf_counter() - start, "kept_float": found.chosen,
            "search_baseline": found.baseline, "search_score": found.score}
    return lowbit_flow(ctx, "w8a8-transformer-mixed", config=found.config, info=info)


# w4-g128-mixed: what autoquant keeps at 8 bits under the file cap (see lowbit_w4_mixed)
MIXED_EMBEDDING_GROUP = 64  # int4 rows in groups of 64: 0.9761 vs 0.9792 int8 rows (GPTQ, torch)
MIXED_MAX_SIZE = 0.195  # of the float32 weight bytes: the .onnx adds its graph to the 0.2x cap
MIXED_MAX_DROP = 0.007  # cosine >= 0.993 on the calibration sentences (ran 0.001-0.003 above the
# evaluation set in earlier runs: 0.9921 there gave 0.9890, 0.9957 gave 0.9947)


def w4_mixed_config() -> QuantConfig:
    """``w4-g128-gptq`` with int4 embedding rows (uint4 in groups of 64 along each row, packed
    two a byte) in place of int8 ones: the word table is half of MiniLM's weights."""
    cfg = QuantConfig.preset("w4-g128-gptq")
    rows = QuantSpec(bits=4, symmetric=False, granularity="per_group",
                     group_size=MIXED_EMBEDDING_GROUP)
    rules = [dataclasses.replace(r, weight=rows) if "Embedding" in (r.types or ()) else r
             for r in cfg.rules]
    return QuantConfig(rules=rules)


ALL4_GROUP = 32  # Linear groups and embedding row groups of the all-4-bit variant


def all4_config() -> QuantConfig:
    """``w4-g32-gptq`` with uint4 word-embedding rows in groups of 32 (the position and
    token-type tables, 0.9% of the weights, stay int8)."""
    rows = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=ALL4_GROUP)
    return QuantConfig(rules=[*QuantConfig.preset(f"w4-g{ALL4_GROUP}-gptq").rules,
                              LayerRule(types=["Embedding"], names=[r"re:.*word_embeddings"],
                                        weight=rows)])


def lowbit_w4_all4(ctx: Ctx) -> Built:
    """Every Linear and the word table at 4 bits (``all4_config``), calibrated on
    ``ctx.more_calib`` sentences (default 1000: the shared 200 and the next 800, all disjoint
    from the evaluation set)."""
    more = with_more_calibration(ctx, ctx.more_calib)
    return lowbit_flow(more, "w4-all4", config=all4_config(), info={
        "recipe": f"w4-g{ALL4_GROUP}-gptq, uint4 word-embedding rows g{ALL4_GROUP}, "
                  f"{len(more.calib_texts)} calibration sentences"})


def with_more_calibration(ctx: Ctx, n: int) -> Ctx:
    """``ctx`` calibrating on ``n`` sentences: the shared 200 and the next ones, all disjoint
    from the evaluation set."""
    texts = ctx.calib_texts + extra_calibration_texts(max(0, n - len(ctx.calib_texts)))
    return dataclasses.replace(ctx, calib_texts=texts,
                               calib_batches=tokenize(ctx.tokenizer, texts, BATCH,
                                                      padding="longest"))


def tuned(ctx: Ctx, name: str, config: QuantConfig, recipe: str) -> Built:
    """``config`` calibrated on ``ctx.more_calib`` sentences, then ``lowbit.tune_scales`` with
    its defaults on the same sentences (the last fifth held out to pick the step): the codes
    the weight algorithm chose, the scales trained on the last hidden state."""
    def tune(qm: nn.Module, info: dict) -> None:
        result, caught = captured(lowbit.tune_scales, qm, ctx.model, more.calib_batches,
                                   progress=False)
        info["warnings"] += caught
        info["tuning"] = {"layers": len(result.layers), "steps": result.steps,
                          "best_step": result.best_step, "seconds": result.seconds,
                          "held_out_before": result.held_out_before,
                          "held_out_after": result.held_out_after, "history": result.history}
        print(result.summary(), file=sys.stderr, flush=True)

    more = with_more_calibration(ctx, ctx.more_calib)
    return lowbit_flow(more, name, config=config, after_calibrate=tune, info={
        "recipe": f"{recipe} on {ctx.more_calib} calibration sentences, then "
                  "lowbit.tune_scales (defaults)"})


def lowbit_w4_tuned(ctx: Ctx) -> Built:
    """Every Linear at 4 bits, groups of 128 (``w4-g128-gptq``), scales tuned."""
    return tuned(ctx, "w4-g128-tuned", QuantConfig.preset("w4-g128-gptq"), "w4-g128-gptq")


def lowbit_w4_all4_tuned(ctx: Ctx) -> Built:
    """``w4-all4`` (g32 Linears, uint4 word-table rows), scales tuned."""
    return tuned(ctx, "w4-all4-tuned", all4_config(),
                 f"w4-g{ALL4_GROUP}-gptq, uint4 word-embedding rows g{ALL4_GROUP}")


def lowbit_w4_mixed(ctx: Ctx) -> Built:
    """``w4_mixed_config()`` plus the Linears ``lowbit.autoquant`` keeps at 8 bits: steps
    as-given → keep-8bit (ranked by ``lowbit.analyze``), ``max_size`` 0.195 of the float32
    weight bytes, scored on the calibration sentences only (mean cosine of the mean-pooled
    embeddings to FP32 >= 0.995); the evaluation sentences never enter the search."""
    with torch.inference_mode():
        ref = [pooled_output(ctx.model, b) for b in ctx.calib_batches]

    def cosine(model: nn.Module) -> float:
        cos = [nn.functional.cosine_similarity(pooled_output(model, b), r, dim=1)
               for b, r in zip(ctx.calib_batches, ref)]
        return float(torch.cat(cos).mean())

    start = time.perf_counter()
    found, _ = captured(lowbit.autoquant, ctx.model, w4_mixed_config(), ctx.calib_batches,
                        cosine, MIXED_MAX_DROP, steps=["as-given", "keep-8bit"],
                        max_size=MIXED_MAX_SIZE)
    info = {"search_s": time.perf_counter() - start, "search_met": found.met,
            "kept_8bit": list(found.kept), "search_score": found.score,
            "search_weight_bytes_ratio": found.weight_bytes / found.float_bytes,
            "search": found.to_dict(), "search_summary": found.summary(),
            "recipe": f"w4-g128-gptq, int4 embedding rows g{MIXED_EMBEDDING_GROUP}, "
                      f"autoquant(max_drop={MIXED_MAX_DROP}, max_size={MIXED_MAX_SIZE}, "
                      "steps=[as-given, keep-8bit]) on the calibration sentences"}
    print(found.summary(), file=sys.stderr, flush=True)
    return lowbit_flow(ctx, "w4-g128-mixed", config=found.config, info=info)


def pooled_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


LOWBIT_PRESETS = ("w8a8", "w8a8-transformer", "w8", "w8-transformer", "w4-g128", "w4-g128-gptq",
                  "w4-g128-awq", "w4-g64-gptq", "w4-g32-gptq")


# key -> (label, group, builder)
REFERENCE_VARIANTS: dict[str, tuple[str, str, Callable[[Ctx], Built]]] = {
    "torch-fp32": ("torch FP32", "reference", build_torch_fp32),
    "ort-fp32": ("ORT FP32", "reference", build_ort_fp32),
}
ANCHOR_VARIANTS: dict[str, tuple[str, str, Callable[[Ctx], Built]]] = {
    "torch-dynamic": ("torch quantize_dynamic", "anchor", build_torch_dynamic),
    "ort-dynamic": ("ORT quantize_dynamic per-channel", "anchor", build_ort_dynamic),
    "ort-static-qdq": ("ORT quantize_static QDQ defaults", "anchor", build_ort_static_qdq),
    "ort-static-matmul": ("ORT quantize_static MatMul-only u8", "anchor",
                          build_ort_static_matmul),
    "ort-int4-g128": ("ORT MatMulNBits int4 g128 (RTN)", "anchor", build_ort_int4),
}
LOWBIT_VARIANTS: dict[str, tuple[str, str, Callable[[Ctx], Built]]] = {
    name: (f"lowbit {name}", "lowbit", lowbit_preset(name)) for name in LOWBIT_PRESETS}
LOWBIT_VARIANTS["w4-g128-adaround"] = ("lowbit w4-g128 + AdaRound", "lowbit", lowbit_w4_adaround)
LOWBIT_VARIANTS["w4-all4"] = ("lowbit w4-g32-gptq + int4 word-table rows g32, --more-calib "
                               "sentences", "lowbit", lowbit_w4_all4)
LOWBIT_VARIANTS["w4-g128-tuned"] = ("lowbit w4-g128-gptq + tune_scales, --more-calib "
                                    "sentences", "lowbit", lowbit_w4_tuned)
LOWBIT_VARIANTS["w4-all4-tuned"] = ("lowbit w4-all4 + tune_scales, --more-calib sentences",
                                    "lowbit", lowbit_w4_all4_tuned)
LOWBIT_VARIANTS["w4-g128-mixed"] = ("lowbit w4-g128-gptq + int4 embedding rows + 8-bit layers "
                                    "found by autoquant(max_size)", "lowbit", lowbit_w4_mixed)
LOWBIT_VARIANTS["w8a8-transformer-mixed"] = ("lowbit w8a8-transformer + float layers found by "
                                             "keep_sensitive_layers", "lowbit", lowbit_mixed)
VARIANTS = REFERENCE_VARIANTS | ANCHOR_VARIANTS | LOWBIT_VARIANTS
GROUPS = {"anchors": list(ANCHOR_VARIANTS), "lowbit": list(LOWBIT_VARIANTS),
          "all": list(VARIANTS)}
