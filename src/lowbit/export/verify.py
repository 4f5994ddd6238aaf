"""Run an exported file in ONNX Runtime and compare it with the torch deploy model.

Three figures: (1) the largest difference between ONNX Runtime's outputs (the shipped file, with
its fused integer kernels) and the torch model's, in LSBs; (2) the share of identical integer
codes over every quantized activation — read from a copy of the file whose QuantizeLinear /
DynamicQuantizeLinear outputs are exposed as graph outputs, matched to the torch quantizers by
their scale initializer names — once as the two runtimes run (ties flipped upstream carried on)
and once with every torch quantizer passing on ONNX Runtime's codes instead of its own (the
*local* share: a layer's own disagreement, which tells a wrong kernel from drift); (3) whether
each weight's codes, scale and zero point, read back from the file (int8/uint8 or packed
INT4/UINT4 initializers, ``MatMulNBits`` blobs), equal the deploy model's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.deploy import DynamicLinear, IntWeight, QuantizeDequantize
from lowbit.numerics import dynamic_quantize


@dataclass
class Parity:
    """How closely ONNX Runtime reproduces the torch deploy model."""

    codes_identical: float | None = None  # share of identical integer codes (None: none found)
    codes_total: int = 0
    tensors_compared: int = 0
    codes_max_diff: int = 0  # largest |code difference| anywhere
    output_max_abs: float = 0.0
    output_max_lsb: float | None = None
    lsb_unit: str = ""
    unmatched: list[str] = field(default_factory=list)
    worst_layers: list[tuple[str, float]] = field(default_factory=list)  # (name, share differing)
    first_identical: float | None = None  # share identical at the first quantized tensor
    # With every layer fed ONNX Runtime's own input codes: what differs is a kernel's own
    # arithmetic, not drift carried from upstream (None: nothing to compare).
    local_identical: float | None = None
    local_total: int = 0
    local_max_diff: int = 0
    local_worst: list[tuple[str, float]] = field(default_factory=list)
    weights_compared: int = 0  # IntWeight tensors found in the file and read back
    weights_differing: list[str] = field(default_factory=list)  # codes/scale/zp not identical


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    return []


def session(path: str | Path, threads: int | None = None, model: Any = None):  # noqa: ANN201
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = str(path) if model is None else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def feed(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    tensors = _flatten(list(inputs))
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"the ONNX model takes {len(names)} inputs, got {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


class _CodeRecorder:
    """Forward hooks that record the integer codes each torch quantizer produces.

    Given ``forced`` (ONNX Runtime's values per quantizer, in call order), each quantizer also
    compares its own codes with ONNX Runtime's and passes ONNX Runtime's on: every layer then
    reads the runtime's input, so what still differs is the layer's own arithmetic, not drift
    carried from upstream."""

    def __init__(self, model: nn.Module,
                 forced: dict[str, list[tuple[np.ndarray, ...]]] | None = None) -> None:
        self.codes: dict[str, list[np.ndarray]] = {}
        # Kept alive (not ids, which Python reuses) so model outputs can be matched by identity.
        self.outputs: list[tuple[torch.Tensor, float]] = []
        self.forced = forced
        self.local: dict[str, list[int]] = {}  # key -> [differing, total], forced pass only
        self.local_max_diff = 0
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, QuantizeDequantize):
                self.handles.append(m.register_forward_hook(self._qdq_hook(name)))
            elif isinstance(m, DynamicLinear):
                self.handles.append(m.register_forward_hook(self._dynamic_hook(name)))

    def _qdq_hook(self, name: str):  # noqa: ANN202
        key = f"{name}.scale"

        def hook(m: QuantizeDequantize, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            codes = m.codes(args[0]).numpy()
            self.codes.setdefault(key, []).append(codes)
            if m.scale.dim() == 0:
                self.outputs.append((out, float(m.scale)))
            theirs = self._runtime_values(key, codes)
            if theirs is None:
                return None
            return m.from_codes(torch.from_numpy(theirs[0]))
        return hook

    def _dynamic_hook(self, name: str):  # noqa: ANN202
        key = f"{name}.weight_t"

        def hook(m: DynamicLinear, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            codes = dynamic_quantize(m.smoothed(args[0]))[0].to(torch.uint8).numpy()
            self.codes.setdefault(key, []).append(codes)
            theirs = self._runtime_values(key, codes)
            if theirs is None or len(theirs) < 3:
                return None
            return m.from_codes(*(torch.from_numpy(np.asarray(t)) for t in theirs[:3]))
        return hook

    def _runtime_values(self, key: str, codes: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """ONNX Runtime's values for this call of ``key`` (forced pass), counted against ours."""
        if self.forced is None:
            return None
        calls = self.codes[key]
        queue = self.forced.get(key, [])
        if len(calls) > len(queue) or queue[len(calls) - 1][0].shape != codes.shape:
            return None
        theirs = queue[len(calls) - 1]
        stats = self.local.setdefault(key, [0, 0])
        stats[0] += int((theirs[0] != codes).sum())
        if codes.size:
            gap = np.abs(theirs[0].astype(np.int32) - codes.astype(np.int32)).max()
            self.local_max_diff = max(self.local_max_diff, int(gap))
        stats[1] += codes.size
        return theirs

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class _Tap:
    """A quantizer's tensors the debug copy exposes: its codes (and, for
    ``DynamicQuantizeLinear``, the scale and zero point it computed), under its torch key."""

    keys: tuple[str, ...]  # one per reader: a DynamicQuantizeLinear may feed several MatMuls
    outputs: tuple[str, ...]


def _debug_model(path: Path) -> tuple[Any, list[_Tap]]:
    """A copy of the model exposing each quantizer's codes, and its taps in graph order."""
    import onnx

    model = onnx.load(str(path))
    taps: list[_Tap] = []
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    existing = {o.name for o in model.graph.output}
    for node in model.graph.node:
        outputs = [node.output[0]]
        if node.op_type == "QuantizeLinear":
            keys = [node.input[1]]
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type == "Clip":
                outputs = [users[0].output[0]]  # a grid narrower than its storage: after Clip
        elif node.op_type == "DynamicQuantizeLinear":
            users = [n for n in consumers.get(node.output[0], []) if n.op_type == "MatMulInteger"]
            if not users:
                continue
            keys = [n.input[1] for n in users]  # q, k and v share one after export's CSE
            outputs = list(node.output[:3])
        else:
            continue
        taps.append(_Tap(tuple(keys), tuple(outputs)))
        for out in outputs:
            if out not in existing:
                existing.add(out)
                model.graph.output.append(onnx.ValueInfoProto(name=out))
    return model, taps


def stored_weight(proto: Any, name: str,
                  weight: IntWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(codes, scale, zero_point)`` of the deploy module ``name`` as stored in ``proto``, in
    the module's own layout; None where the file holds no initializer ``<name>.codes``."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    codes_name = f"{name}.codes"
    node = next((n for n in proto.graph.node if codes_name in n.input
                 and n.op_type in ("DequantizeLinear", "MatMulNBits")), None)
    if node is None or codes_name not in inits:
        return None

    def array(i: int) -> np.ndarray | None:
        present = len(node.input) > i and node.input[i]
        return numpy_helper.to_array(inits[node.input[i]]) if present else None

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":  # B [N, K/block, block/2]: uint4 codes, low nibble first
        n, k, bits = attrs["N"], attrs["K"], attrs.get("bits", 4)
        if bits != 4:
            return None
        b, scale, zp = array(1), array(2), array(3)
        if b is None or scale is None:
            return None
        codes = _nibbles(b.reshape(n, -1))[:, :k]
        scale = scale.reshape(n, -1)
        zero_point = (np.full(scale.shape, 8) if zp is None
                      else _nibbles(zp.reshape(n, -1))[:, : scale.shape[1]])
        shift = 8 if weight.grid.signed else 0  # signed grids are stored moved up by 8
        return codes - shift, scale, zero_point - shift
    q, s, zp = array(0), array(1), array(2)
    if node.op_type != "DequantizeLinear" or q is None or s is None:
        return None
    codes, scale = q.astype(np.int64), s
    zero_point = np.zeros(scale.shape, np.int64) if zp is None else zp.astype(np.int64)
    if weight.block_size and codes.ndim == 2 and attrs.get("axis", 1) != weight.axis:
        codes, scale, zero_point = codes.T, scale.T, zero_point.T  # stored [K, N]
    return codes, scale, zero_point


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Rows of uint8 bytes → rows of 4-bit values, low nibble first."""
    packed = packed.astype(np.int64)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def check_weights(model: nn.Module, proto: Any) -> tuple[int, list[str]]:
    """How many weights were read back from the file, and which differ from ``model``'s."""
    compared, differing = 0, []
    for name, m in model.named_modules():
        if not isinstance(m, IntWeight):
            continue
        stored = stored_weight(proto, name, m)
        if stored is None:
            continue
        compared += 1
        expected = (m.codes.numpy().astype(np.int64), m.scale.numpy(),
                    m.zero_point.numpy().astype(np.int64))
        if not all(a.shape == b.shape and np.array_equal(a, b)
                   for a, b in zip(stored, expected)):
            differing.append(name)
    return compared, differing


@torch.no_grad()
def verify(model: nn.Module, path: Path, input_sets: Sequence[Sequence[Any]],
           threads: int | None = None) -> Parity:
    import onnx

    parity = Parity()
    parity.weights_compared, parity.weights_differing = check_weights(model,
                                                                       onnx.load(str(path)))
    shipped = session(path, threads)
    debug_proto, taps = _debug_model(path)
    debug = session(path, threads, model=debug_proto) if taps else None
    debug_names = [o.name for o in debug.get_outputs()] if debug else []

    same = total = 0
    per_key: dict[str, list[int]] = {}
    per_key_local: dict[str, list[int]] = {}
    max_lsb = 0.0
    units = set()
    for inputs in input_sets:
        recorder = _CodeRecorder(model)
        try:
            ref = _flatten(model(*inputs))
        finally:
            recorder.close()
        got = shipped.run(None, feed(shipped, inputs))
        for r, g in zip(ref, got):
            diff = np.abs(r.numpy().astype(np.float64) - g.astype(np.float64))
            worst = float(diff.max()) if diff.size else 0.0
            parity.output_max_abs = max(parity.output_max_abs, worst)
            unit = next((s for t, s in recorder.outputs if t is r), None)
            if unit is None:
                amax = float(r.abs().max()) if r.numel() else 0.0
                unit = amax / 127 if amax > 0 else 1.0
                units.add("int8 step of the output's range (max|y|/127; the output is float)")
            else:
                units.add("the output quantizer's scale")
            max_lsb = max(max_lsb, worst / unit)
        if debug is None:
            continue
        outs = dict(zip(debug_names, debug.run(None, feed(debug, inputs))))
        forced = _forced_pass(model, inputs, taps, outs)
        parity.local_max_diff = max(parity.local_max_diff, forced.local_max_diff)
        for key, (d, n) in forced.local.items():
            stats = per_key_local.setdefault(key, [0, 0])
            stats[0] += d
            stats[1] += n
        seen: dict[str, int] = {}
        for out_name, key in ((t.outputs[0], k) for t in taps for k in t.keys):
            torch_codes = recorder.codes.get(key)
            if not torch_codes:
                if key not in parity.unmatched:
                    parity.unmatched.append(key)
                continue
            i = seen.get(key, 0)
            seen[key] = i + 1
            if i >= len(torch_codes):
                continue
            a, b = torch_codes[i], outs[out_name]
            if a.shape != b.shape:
                parity.unmatched.append(key)
                continue
            n_same = int((a == b).sum())
            if a.size:
                gap = np.abs(a.astype(np.int32) - b.astype(np.int32)).max()
                parity.codes_max_diff = max(parity.codes_max_diff, int(gap))
            same += n_same
            total += a.size
            stats = per_key.setdefault(key, [0, 0])
            stats[0] += a.size - n_same
            stats[1] += a.size
    parity.codes_total = total
    parity.tensors_compared = len(per_key)
    parity.codes_identical = same / total if total else None
    parity.output_max_lsb = max_lsb
    parity.lsb_unit = "; ".join(sorted(units))
    parity.worst_layers = _worst(per_key)
    local_differing = sum(d for d, _ in per_key_local.values())
    parity.local_total = sum(n for _, n in per_key_local.values())
    if parity.local_total:
        parity.local_identical = 1 - local_differing / parity.local_total
    parity.local_worst = _worst(per_key_local)
    if per_key:  # graph order: where a disagreement starts tells a drift from a wrong kernel
        d, n = next(iter(per_key.values()))
        parity.first_identical = 1 - d / n if n else None
    return parity


def _forced_pass(model: nn.Module, inputs: Sequence[Any], taps: list[_Tap],
                 outs: dict[str, np.ndarray]) -> _CodeRecorder:
    """Run ``model`` with every quantizer passing on ONNX Runtime's values (``outs`` of the
    debug copy) instead of its own; the recorder holds the local agreement."""
    runtime: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for tap in taps:
        for key in tap.keys:
            runtime.setdefault(key, []).append(tuple(outs[o] for o in tap.outputs))
    forced = _CodeRecorder(model, forced=runtime)
    try:
        model(*inputs)
    finally:
        forced.close()
    return forced


def _worst(per_key: dict[str, list[int]], top: int = 5) -> list[tuple[str, float]]:
    """The layers whose codes differ most, as ``(layer, share differing)``."""
    ranked = sorted(((k.rsplit(".", 1)[0], d / n) for k, (d, n) in per_key.items() if d),
                    key=lambda kv: -kv[1])
    return ranked[:top]
