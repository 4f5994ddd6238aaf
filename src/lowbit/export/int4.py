"""How 4-bit per-group Linear weights are stored: packed INT4 ``DequantizeLinear`` or
``com.microsoft.MatMulNBits``.

The exporter writes a per-group weight of a Linear as int8 codes → blocked ``DequantizeLinear``
(blocks along axis 1 of the ``[N, K]`` weight) → ``Transpose`` → ``MatMul`` (``Gemm`` with
``transB=1`` for 2-D inputs): one byte per 4-bit code, and ONNX Runtime runs a float MatMul on a
weight it dequantizes on every run. This pass rewrites each such weight after export:

- ``"dequantize"``: an opset-21 INT4/UINT4 initializer (two codes a byte), stored ``[K, N]`` with
  its blocks along axis 0 and feeding ``MatMul`` directly. That is the form ONNX Runtime's
  ``DQMatMulToMatMulNBits`` transformer fuses into ``MatMulNBits``; the exported ``[N, K]`` +
  ``Transpose`` form is not fused (ORT 1.32). Standard ONNX, but the fused kernel runs at the
  session's ``session.qdq_matmulnbits_accuracy_level``, default 4: activations quantized to
  int8 per block, so outputs move by about one int8 step of the activations.
- ``"matmulnbits"``: ``com.microsoft.MatMulNBits`` in the file (uint4 codes; signed grids move
  up by 8, MatMulNBits' default zero point), no ``accuracy_level``: float activations, the same
  values as the deploy model up to float rounding. ONNX Runtime only.

In ONNX Runtime both end up as the same ``MatMulNBits`` kernel; they differ in what the
activations are rounded to by default and in who else can run the file. ``"auto"`` picks
``"matmulnbits"``: the file computes what the deploy model computes (see ``AUTO_INT4_FORMAT``).

A weight that does not sit in that pattern (its dequantized value used elsewhere) keeps its
graph and only gets INT4 storage; ``"matmulnbits"`` needs a block size that is a power of two
>= 16 and falls back to ``"dequantize"`` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lowbit.deploy import IntWeight
from lowbit.numerics import pack_bits

Int4Format = Literal["auto", "dequantize", "matmulnbits"]
INT4_FORMATS = ("auto", "dequantize", "matmulnbits")
# benchmarks/int4_matmul.py (6 BERT-small FFNs, input 32x128x384, ORT 1.32, 2 threads, AMD EPYC
# with AVX-512 VNNI): both forms run as the same MatMulNBits kernel; with ORT's default session
# "dequantize" runs it on int8 activations at ~0.8x FP32 time, "matmulnbits" in float at ~0.95x.
# "auto" takes the exact one: a weight-only model whose runtime silently quantizes its
# activations is not the model that was quantized (on the tiny BERT of the tests the outputs
# moved by 1e-3 at accuracy level 4), and export_onnx's parity check would have to excuse it.
AUTO_INT4_FORMAT = "matmulnbits"
MS_DOMAIN = "com.microsoft"


def resolve_int4_format(choice: str) -> tuple[str, str]:
    """The storage of 4-bit per-group Linear weights and the reason, for the report."""
    if not isinstance(choice, str) or choice not in INT4_FORMATS:
        raise ValueError(f"`int4_format` must be one of {list(INT4_FORMATS)}, got {choice!r}")
    if choice != "auto":
        return choice, "as requested"
    return AUTO_INT4_FORMAT, ("auto: ONNX Runtime's MatMulNBits on float activations, the same "
                              "values as the deploy model")


def packable(weight: IntWeight) -> bool:
    """A per-group ``[N, K]`` weight blocked along K whose codes fit a 4-bit type."""
    grid = weight.grid
    lo, hi = (-8, 7) if grid.signed else (0, 15)
    return (weight.block_size > 0 and weight.codes.dim() == 2 and weight.axis == 1
            and lo <= grid.qmin and grid.qmax <= hi
            and bool(((weight.zero_point >= lo) & (weight.zero_point <= hi)).all()))


def nbits_block(block_size: int) -> bool:
    """MatMulNBits' block sizes: powers of two from 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def int4_tensor(values: torch.Tensor, signed: bool, name: str) -> Any:
    """An INT4 (``signed``, two's complement) or UINT4 initializer: ONNX packs two values a
    byte, the first in the low nibble, as ``pack_bits`` does."""
    from onnx import TensorProto, helper

    nibbles = pack_bits(values.to(torch.int64) & 15, 4).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4,
                              list(values.shape), nibbles, raw=True)


def matmulnbits_b(codes: torch.Tensor, block_size: int) -> torch.Tensor:
    """MatMulNBits' B: uint4 codes ``[N, K]`` as uint8 ``[N, K / block, block / 2]``."""
    n, k = codes.shape
    return pack_bits(codes, 4).reshape(n, k // block_size, block_size // 2)


def rewrite_int4_weights(proto: Any, model: nn.Module, fmt: str) -> list[str]:
    """Store the 4-bit per-group Linear weights of ``proto`` in ``fmt``, in place.

    ``proto`` is the export of ``model``; weights are found by their codes' initializer names
    (``<module>.codes``). Returns the names of the ``IntWeight`` modules stored at 4 bits.
    """
    from onnx import helper

    weights = {f"{n}.codes": m for n, m in model.named_modules()
               if isinstance(m, IntWeight) and packable(m)}
    graph = _Graph(proto.graph)
    done = []
    for codes_name, weight in weights.items():
        dqs = graph.users.get(codes_name, [])
        if not dqs or not graph.owned(dqs):
            continue  # not (only) read by this weight's DequantizeLinear nodes: leave it
        site = graph.linear_site(dqs[0]) if len(dqs) == 1 else None
        if site is None:
            for dq in dqs:
                graph.set_int4(dq, weight, transpose=False)
        elif fmt == "matmulnbits" and nbits_block(weight.block_size):
            graph.to_matmulnbits(dqs[0], site, weight)
        else:
            graph.to_blocked_kn(dqs[0], site, weight)
        done.append(codes_name[: -len(".codes")])
    graph.commit()
    if any(n.domain == MS_DOMAIN for n in proto.graph.node) and \
            not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


Site = tuple[int, int | None]  # (MatMul or Gemm, the Transpose before a MatMul)


class _Graph:
    """An editable view of an ONNX graph: nodes by index, their users, replacements."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.inits = {i.name: i for i in graph.initializer}
        self.users: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                self.users.setdefault(name, []).append(i)
        self.outputs = {o.name for o in graph.output}
        self.dropped: set[int] = set()
        self.swapped: dict[int, list[Any]] = {}
        self.new_inits: dict[str, Any] = {}  # name -> tensor, or None to remove

    def owned(self, dqs: list[int]) -> bool:
        """Are ``dqs`` DequantizeLinear nodes whose inputs are initializers read by them only?"""
        if any(self.nodes[i].op_type != "DequantizeLinear" for i in dqs):
            return False
        names = [n for n in self.nodes[dqs[0]].input if n]
        return all(n in self.inits and sorted(self.users[n]) == sorted(dqs) for n in names)

    def _only_user(self, name: str) -> int | None:
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def linear_site(self, dq: int) -> Site | None:
        """Where the dequantized weight is only the right operand of one Linear's product."""
        weight = self.nodes[dq].output[0]
        user = self._only_user(weight)
        if user is None:
            return None
        node = self.nodes[user]
        if node.op_type == "Transpose" and _attr(node, "perm") == [1, 0]:
            matmul = self._only_user(node.output[0])
            if matmul is not None and self.nodes[matmul].op_type == "MatMul" \
                    and self.nodes[matmul].input[1] == node.output[0]:
                return matmul, user
            return None
        plain = (_attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1
                 and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)
        if node.op_type == "Gemm" and plain and node.input[1] == weight:
            return user, None
        return None

    def _replace(self, dq: int, site: Site,
                 product: Callable[[str, str, str], list[Any]]) -> None:
        """Drop the DequantizeLinear (and Transpose); the MatMul/Gemm becomes
        ``product(x, out, name)`` (+ ``Add`` of the Gemm's bias)."""
        from onnx import helper

        user, transpose = site
        node = self.nodes[user]
        self.dropped.add(dq)
        if transpose is not None:
            self.dropped.add(transpose)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        out = f"{node.output[0]}_matmul" if bias else node.output[0]
        new = product(node.input[0], out, node.name)
        if bias:
            new.append(helper.make_node("Add", [out, bias], [node.output[0]],
                                        name=f"{node.name}_bias"))
        self.swapped[user] = new

    def to_blocked_kn(self, dq: int, site: Site, weight: IntWeight) -> None:
        """INT4 ``[K, N]`` blocked along axis 0 → ``MatMul``: the form ORT fuses."""
        from onnx import helper

        node = self.nodes[dq]
        inputs = self.set_int4(dq, weight, transpose=True)
        w = f"{node.output[0]}_kn"

        def product(x: str, out: str, name: str) -> list[Any]:
            return [helper.make_node("DequantizeLinear", inputs, [w], name=node.name, axis=0,
                                     block_size=weight.block_size),
                    helper.make_node("MatMul", [x, w], [out], name=name)]

        self._replace(dq, site, product)

    def to_matmulnbits(self, dq: int, site: Site, weight: IntWeight) -> None:
        """``com.microsoft.MatMulNBits(x, B, scales[, zero_points])``, float accumulation."""
        from onnx import helper, numpy_helper

        node = self.nodes[dq]
        codes_name, scale_name = node.input[0], node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 else ""
        shift = 8 if weight.grid.signed else 0  # uint4 codes
        codes = weight.codes.to(torch.int64) + shift
        zero_point = weight.zero_point.to(torch.int64) + shift
        n, k = codes.shape
        self.new_inits[codes_name] = numpy_helper.from_array(
            matmulnbits_b(codes, weight.block_size).numpy(), codes_name)
        self.new_inits[scale_name] = numpy_helper.from_array(
            weight.scale.float().reshape(-1).numpy(), scale_name)
        names = [codes_name, scale_name]
        if zp_name and bool((zero_point == 8).all()):  # MatMulNBits' default for 4 bits
            self.new_inits[zp_name] = None
        elif zp_name:  # packed per row: [N, ceil(blocks / 2)]
            odd = zero_point.shape[1] % 2
            padded = torch.cat([zero_point, zero_point.new_zeros(n, odd)], dim=1)
            self.new_inits[zp_name] = numpy_helper.from_array(
                pack_bits(padded, 4).reshape(n, -1).numpy(), zp_name)
            names.append(zp_name)

        def product(x: str, out: str, name: str) -> list[Any]:
            return [helper.make_node("MatMulNBits", [x, *names], [out], name=name,
                                     domain=MS_DOMAIN, K=k, N=n, bits=4,
                                     block_size=weight.block_size)]

        self._replace(dq, site, product)

    def set_int4(self, dq: int, weight: IntWeight, *, transpose: bool) -> list[str]:
        """INT4/UINT4 codes and zero point, float scale (``transpose``: ``[K, N]`` layout).
        A new node (``transpose``) leaves out an all-zero zero point. Returns its inputs."""
        from onnx import numpy_helper

        node = self.nodes[dq]
        codes_name, scale_name = node.input[0], node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 else ""

        def layout(x: torch.Tensor) -> torch.Tensor:
            return x.t().contiguous() if transpose else x

        signed = weight.grid.signed
        self.new_inits[codes_name] = int4_tensor(layout(weight.codes), signed, codes_name)
        self.new_inits[scale_name] = numpy_helper.from_array(layout(weight.scale).numpy(),
                                                             scale_name)
        names = [codes_name, scale_name]
        if zp_name and transpose and bool((weight.zero_point == 0).all()):
            self.new_inits[zp_name] = None
        elif zp_name:
            self.new_inits[zp_name] = int4_tensor(layout(weight.zero_point), signed, zp_name)
            names.append(zp_name)
        return names

    def commit(self) -> None:
        """Write the replacements back into the graph (nodes keep their order)."""
        nodes = []
        for i, node in enumerate(self.nodes):
            if i in self.swapped:
                nodes.extend(self.swapped[i])
            elif i not in self.dropped:
                nodes.append(node)
        inits = [self.new_inits.get(i.name, i) for i in self.graph.initializer]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(i for i in inits if i is not None)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default
