"""Resolve a config's rules against a model: ``lowbit.plan`` builds the ``Plan``.

It finds the quantizable layers (and the weight-holding modules that stay float, with why),
resolves each against the rules with its positions (first/last layer), folds BatchNorms found in
the traced dataflow, and places quantizers where ONNX Runtime needs them: functional adds, cats
and pools between quantized layers, max pools and upsamplings that keep the grid, the outputs
of convs that feed a float op, the sigmoid gates after them, and the products of two quantized
tensors and the average pools that read them (squeeze-excite).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from lowbit.attention import has_multihead_attention, unfolded_copy
from lowbit.config import (
    QuantConfig,
    warn_unmatched_names,
)
from lowbit.float_modules import float_class, is_parametrization_list, weight_parameters
from lowbit.functional import (
    FUNCTIONAL_TYPES,
    GRID_KEEPING_FUNCTIONS,
    OwnerTracer,
    before_global_pool,
    between_quantized,
    comes_from,
    find_functional,
    find_grid_keeping_calls,
    reaches_float_op,
)
from lowbit.fuse import NORMS, find_chains
from lowbit.nn import (
    AVERAGE_POOL_TYPES,
    GATE_TYPES,
    GRID_KEEPING_TYPES,
    OPT_IN_TYPES,
    keeps_grid,
    quant_type_for,
)
from lowbit.plan import LayerPlan, Plan, holds_weight
from lowbit.registry import LAYERS
from lowbit.trace import ModelGraph, Node, trace

CONV_TYPES = {"Conv1d", "Conv2d"}
# Products of two activations: "between" quantized layers only where *both* factors come from
# quantized layers (a feature map times its quantized sigmoid gate), not where one is float
# (a transformer MLP's act(gate) * up, whose act stays float).
PRODUCTS = {"mul"}


def plan(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Sequence[object] | dict[str, object] | None = None,
    *,
    graph: ModelGraph | None = None,
) -> Plan:
    """Resolve ``config`` against ``model``: one ``LayerPlan`` per quantizable layer.

    The model's dataflow (``lowbit.trace``) decides which BatchNorms fold and where functional
    ``add``/``matmul`` ops sit: torch.fx where the model traces, otherwise one run on
    ``example_inputs`` (a tuple of positional inputs or a dict of keyword inputs; Hugging Face
    models get inputs made from their config when none are given). ``graph`` reuses a trace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig, got {type(config).__name__}")
    check_example_inputs(example_inputs)
    if has_multihead_attention(model):  # planned as quantize will see it: written out
        model = unfolded_copy(model)
        graph = None

    layers: list[LayerPlan] = []
    found, skipped = discover_layers(model, {t for rule in config.rules for t in rule.types})
    weighted = [name for name, type_name, _ in found
                if type_name not in FUNCTIONAL_TYPES | OPT_IN_TYPES]
    for name, type_name, module_type in found:
        positions = frozenset(p for p, n in (("first", weighted[:1]), ("last", weighted[-1:]))
                              if name in n)
        entry = _resolve(config, name, type_name, positions)
        entry = entry if module_type is None else replace(entry, module_type=module_type)
        misfit = _group_misfit(model, entry)
        if misfit:
            skipped[name] = misfit  # the rest of the model still takes the preset
        else:
            layers.append(entry)

    if graph is None:
        graph = trace(model, example_inputs)
    if graph is not None:
        layers = _drop_uncalled(layers, graph, skipped)
    fusions = find_chains(model, graph) if config.fuse_bn else []
    wanted = {t for rule in config.rules for t in rule.types} & FUNCTIONAL_TYPES
    rewritable = OwnerTracer(model)  # one fx trace per calling module, for both placements
    if wanted - PRODUCTS:
        layers = _place_functional(model, config, graph, layers, fusions, wanted - PRODUCTS,
                                   rewritable)
    layers = _place_grid_keeping(model, config, graph, layers, fusions, rewritable)
    if graph is not None and any("feeds_float" in rule.positions for rule in config.rules):
        layers = _place_outputs(model, config, graph, layers, fusions)
    layers = _place_gates(model, config, graph, layers, fusions)
    if wanted & PRODUCTS:  # after the gates: a squeeze-excite product reads one
        layers = _place_functional(model, config, graph, layers, fusions, wanted & PRODUCTS,
                                   rewritable)
    layers = _place_average_pools(model, config, graph, layers, fusions)
    if graph is None:
        warnings.warn("lowbit could not trace the model (torch.fx failed and there are no "
                      "example_inputs): BatchNorm folds only between neighbours in "
                      "nn.Sequential, layers reading one tensor keep their own quantizers and "
                      "quantizers are not placed for ONNX Runtime's integer kernels; pass "
                      "example_inputs=(x,) to quantize/plan", stacklevel=2)
    for name, module in model.named_modules():
        if isinstance(module, NORMS) and config.fuse_bn and not any(name in c for c in fusions):
            skipped[name] = "BatchNorm not directly after a Conv/Linear: left in float"
    warn_unmatched_names(config, [n for n, _ in model.named_modules()] + [x.name for x in layers])
    return Plan(layers=layers, fusions=fusions, skipped=skipped)


def discover_layers(model: nn.Module, named_types: set[str]
                    ) -> tuple[list[tuple[str, str, str | None]], dict[str, str]]:
    """The model's quantizable layers as ``(name, layer type, own class name if it differs)``,
    and the modules holding weights that stay float, with the reason.

    The rule for the second: any module with a parameter of two or more dimensions of its own
    (or a parametrized one) that is not a quantizable layer — an unsupported type (LSTM,
    ConvTranspose, a custom module) or an opt-in type no rule names (Embedding). Nothing
    holding a weight is left out of the plan without a word.
    """
    found: list[tuple[str, str, str | None]] = []
    skipped: dict[str, str] = {}
    # Left as they are (lowbit.attention writes out the others): they read their out_proj's
    # weight instead of calling it, so a wrapper there would never see an input.
    attention = {f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if is_parametrization_list(module):
            continue  # the originals of a parametrized weight: its owner stands for them
        if name in attention:
            skipped[name] = ("out_proj of an nn.MultiheadAttention left as it is (add_bias_kv, "
                             "add_zero_attn, or the model itself), which reads its weight "
                             "instead of calling it")
            continue
        type_name = quant_type_for(module)
        if type_name in OPT_IN_TYPES and type_name not in named_types:
            # Activations and embeddings take part only where a rule names the type.
            if weight_parameters(module):
                skipped[name] = f"{type_name} is quantized only where a rule names the type"
            continue
        if type_name is None:
            held = weight_parameters(module)
            if held:
                why = f"{float_class(module).__name__} is not supported yet"
                skipped[name] = why if held == ["weight"] else f"{why} (float: {', '.join(held)})"
            continue
        own = float_class(module).__name__
        found.append((name, type_name, own if own != LAYERS.get(type_name).float_type.__name__
                      else None))
    return found, skipped


def _drop_uncalled(layers: list[LayerPlan], graph: ModelGraph,
                   skipped: dict[str, str]) -> list[LayerPlan]:
    """The weight layers the traced forward calls; the others go to ``skipped``. Model code
    that reads a layer's weight instead of calling it (WavLM's attention hands ``q_proj.weight``
    to ``F.multi_head_attention_forward``) would give a wrapper no input to calibrate and a
    tensor-shaped object that is not a tensor; a layer the forward never uses (Conformer's
    unused positional conv) has nothing to quantize either."""
    called = graph.module_calls()

    def reached(name: str) -> bool:  # it, or a module traced as one node around it, was called
        parts = name.split(".")
        return any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1))

    kept = []
    for layer in layers:
        if layer.type in FUNCTIONAL_TYPES | OPT_IN_TYPES or reached(layer.name):
            kept.append(layer)
        else:
            skipped[layer.name] = ("not called by the model's forward (its code reads the "
                                   "weight instead, or never uses the layer): left in float")
    return kept


def _group_misfit(model: nn.Module, entry: LayerPlan) -> str | None:
    """Why a per-group weight spec cannot apply to this layer (its input width is not a
    multiple of ``group_size``, e.g. a 64-wide classifier under ``w4-g128``), or None."""
    spec = entry.weight
    if spec is None or spec.granularity != "per_group" or spec.group_size is None:
        return None
    weight = getattr(model.get_submodule(entry.name), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    width = weight.shape[0] if entry.module_type == "Conv1D" else weight.shape[1]
    if width % spec.group_size == 0:
        return None
    return (f"kept in float: group_size {spec.group_size} does not divide its {width} input "
            "channels (give it a rule with a group size that does, or per_channel)")


def check_example_inputs(example_inputs: object) -> None:
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list, dict)):
        raise TypeError("`example_inputs` must be a tuple of the model's positional inputs "
                        f"or a dict of keyword inputs, got {type(example_inputs).__name__}; "
                        "write (x,)")


def _place_functional(model: nn.Module, config: QuantConfig, graph: ModelGraph | None,
                      layers: list[LayerPlan], fusions: Sequence[Sequence[str]],
                      wanted: set[str], rewritable: OwnerTracer) -> list[LayerPlan]:
    """Plan entries for functional ops: one per call site, where the model traces with fx.

    Elsewhere (a dispatch trace cannot rewrite ``forward``) the sites stay float; a rule for
    every add/matmul (no ``positions``) needs fx and is refused."""
    explicit = sorted({t for rule in config.rules if not rule.positions for t in rule.types}
                      & wanted)
    if graph is None or graph.method != "fx":
        if explicit:
            how = "it does not trace with torch.fx" if graph is not None else \
                "it traces neither with torch.fx nor on example inputs"
            raise NotImplementedError(
                f"rules for {explicit} need a model that torch.fx can trace, and {how}; use "
                "lowbit.nn.Add / MatMul / Cat modules in the model, or limit the rule to "
                "positions=['between']")
        if graph is None:
            return layers
    modules = _graph_modules(model, fusions)
    producers = {x.name for x in layers if not x.is_float and x.type not in FUNCTIONAL_TYPES}
    readers = {x.name for x in layers if x.input is not None and not x.input.dynamic}
    kept_float: list[str] = []
    placed: set[str] = set()
    for site in find_functional(graph, wanted):
        if site.name in placed:  # a module called twice: its sites are planned once
            continue
        between = between_quantized(graph, site, modules, producers, readers,
                                    every_input=site.target in PRODUCTS)
        positions = frozenset({"between"}) if between else frozenset()
        if not between and before_global_pool(graph, site, modules, producers):
            positions, between = frozenset({"before_pool"}), True
        # The whole model need not trace: only the module whose forward makes the call is
        # rewritten (HF models rarely trace as a whole; their blocks mostly do).
        if graph.method == "fx" or (between and rewritable(site.name.rpartition(".")[0])):
            layers.append(_resolve(config, site.name, site.target, positions))
            placed.add(site.name)
        elif between:
            rule = config.resolve(site.name, site.target, positions)
            if rule is not None and rule.input is not None:
                kept_float.append(site.name)
    if kept_float:
        warnings.warn(f"{len(kept_float)} functional op(s) between quantized layers stay float, "
                      f"because the modules that call them do not trace with torch.fx (so "
                      f"their forward cannot be rewritten): {kept_float[:5]}; the convs "
                      "feeding them quantize their outputs instead (module-level placement)",
                      stacklevel=3)
    return layers


def _place_grid_keeping(model: nn.Module, config: QuantConfig, graph: ModelGraph | None,
                        layers: list[LayerPlan], fusions: Sequence[Sequence[str]],
                        rewritable: OwnerTracer) -> list[LayerPlan]:
    """Max pools and nearest upsamplings that a rule names: those a rule quantizes as they are
    keep their entry; the others are re-resolved with position ``"between"`` where they read a
    quantized layer (or op) and quantized layers read them, and otherwise dropped from the plan
    (a pool in a float region is not a float *layer*). A pool returning indices, or an upsampling
    that interpolates (its values leave the grid), is never wrapped. Functional calls of them
    (``F.max_pool2d``, ``F.interpolate``) between quantized layers get an entry of the module
    type under their site name (``op_max_pool2d``), where the calling module traces with fx
    (``quantize`` turns them into that module)."""
    wanted = {t for rule in config.rules for t in rule.types} & GRID_KEEPING_TYPES
    pools = [x for x in layers if x.type in GRID_KEEPING_TYPES]
    if not pools and not (wanted and graph is not None):
        return layers
    modules = _graph_modules(model, fusions)
    layers = [x for x in layers if x.type not in GRID_KEEPING_TYPES
              or keeps_grid(model.get_submodule(x.name))]
    quantized = {x.name for x in layers if not x.is_float and x.type not in GRID_KEEPING_TYPES}
    readers = {x.name for x in layers if x.input is not None and not x.input.dynamic}
    out = _place_at(config, graph, layers, GRID_KEEPING_TYPES, "between",
                    lambda g, node: between_quantized(g, node, modules, quantized, readers))
    if graph is None or not wanted:
        return out
    # In graph order, each placed site feeding the next (a pool after an upsampling).
    producers = quantized | {x.name for x in out if x.type in GRID_KEEPING_TYPES}
    for site in find_grid_keeping_calls(graph, wanted):
        if not between_quantized(graph, site, modules, producers, readers):
            continue
        entry = _resolve(config, site.name, GRID_KEEPING_FUNCTIONS[site.target],
                         frozenset({"between"}))
        if not entry.is_float and rewritable.becomes_module(site.name):
            out.append(entry)
            producers.add(site.name)
    return out


def _graph_modules(model: nn.Module, fusions: Sequence[Sequence[str]]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for chain in fusions:  # a folded BatchNorm passes values through
        modules[chain[1]] = nn.Identity()
    return modules


def _place_outputs(model: nn.Module, config: QuantConfig, graph: ModelGraph,
                   layers: list[LayerPlan], fusions: Sequence[Sequence[str]]) -> list[LayerPlan]:
    """Re-resolve, with position ``"feeds_float"``, each quantized conv whose output a float op
    reads (a float add where ``forward`` could not be rewritten, a LayerNorm, a mean), also
    where quantized layers read it too. ONNX Runtime fuses ``DQ → Conv → Q`` only, so the
    presets quantize such a conv's output; a layer reading it with an input spec of the same
    kind reads it as it is (``share.reuse_output_quantizers``)."""
    modules = _graph_modules(model, fusions)
    readers = {x.name for x in layers if x.input is not None and not x.input.dynamic}
    calls = graph.module_calls()
    weighted = [x.name for x in layers if x.type not in FUNCTIONAL_TYPES | OPT_IN_TYPES]
    out = []
    for layer in layers:
        nodes = calls.get(layer.name, [])
        if (layer.type not in CONV_TYPES or layer.input is None or layer.input.dynamic
                or layer.output is not None or len(nodes) != 1
                or not reaches_float_op(graph, nodes[0], modules, readers)):
            out.append(layer)
            continue
        positions = {"feeds_float"} | {p for p, n in (("first", weighted[:1]),
                                                      ("last", weighted[-1:])) if layer.name in n}
        out.append(_resolve(config, layer.name, layer.type, frozenset(positions)))
    return out


def _place_gates(model: nn.Module, config: QuantConfig, graph: ModelGraph | None,
                 layers: list[LayerPlan], fusions: Sequence[Sequence[str]]) -> list[LayerPlan]:
    """Sigmoids and SiLUs that a rule names: those a rule quantizes as they are keep their
    entry; the others are re-resolved with position ``"gate"`` where their input is the
    quantized output of a layer (ONNX Runtime then reads it as ``DequantizeLinear`` and runs the
    sigmoid on uint8), and otherwise dropped from the plan (a sigmoid in a float region is not
    a float *layer*). Runs after ``_place_outputs``, which decides those outputs."""
    if not any(x.type in GATE_TYPES for x in layers):
        return layers
    modules = _graph_modules(model, fusions)
    producers = {x.name for x in layers if x.output is not None and x.type not in GATE_TYPES}
    return _place_at(config, graph, layers, GATE_TYPES, "gate",
                     lambda g, node: comes_from(g, node, modules, producers))


def _place_average_pools(model: nn.Module, config: QuantConfig, graph: ModelGraph | None,
                         layers: list[LayerPlan], fusions: Sequence[Sequence[str]]
                         ) -> list[LayerPlan]:
    """Average pools that a rule names: those a rule quantizes as they are keep their entry;
    the others are re-resolved with position ``"between"`` where they read a quantized layer
    whose output nobody quantizes yet (a SiLU gate's product, read by a quantized product too)
    and quantized layers read them, and otherwise dropped from the plan (a pool in a float
    region, or after a quantized output that it would only read as it is, is not a float
    *layer*). Runs last: the gates and products it reads are placed by then."""
    if not any(x.type in AVERAGE_POOL_TYPES for x in layers):
        return layers
    modules = _graph_modules(model, fusions)
    producers = {x.name for x in layers if not x.is_float and x.type not in AVERAGE_POOL_TYPES}
    quantized_outputs = {x.name for x in layers if x.output is not None
                         and x.type not in GATE_TYPES}  # a gate's output quantizer: its sigmoid
    readers = {x.name for x in layers if x.input is not None and not x.input.dynamic}
    return _place_at(config, graph, layers, AVERAGE_POOL_TYPES, "between",
                     lambda g, node: between_quantized(g, node, modules, producers, readers)
                     and not comes_from(g, node, modules, quantized_outputs))


def _place_at(config: QuantConfig, graph: ModelGraph | None, layers: list[LayerPlan],
              types: set[str], position: str,
              where: Callable[[ModelGraph, Node], bool]) -> list[LayerPlan]:
    """The placement of opt-in module types (pools, gates): entries of ``types`` that a rule
    quantizes as they are stay; the float ones are re-resolved with ``position`` where the
    module is called once and ``where(graph, call)`` holds (keeping the class it was found as,
    e.g. ``SiLUActivation``), and otherwise dropped from the plan: an activation or a pool in
    a float region is not a float *layer*."""
    calls = graph.module_calls() if graph is not None else {}
    out = []
    for layer in layers:
        if layer.type not in types or not layer.is_float:
            out.append(layer)
            continue
        nodes = calls.get(layer.name, [])
        if graph is not None and len(nodes) == 1 and where(graph, nodes[0]):
            entry = _resolve(config, layer.name, layer.type, frozenset({position}))
            if not entry.is_float:
                out.append(replace(entry, module_type=layer.module_type))
    return out


def _resolve(config: QuantConfig, name: str, type_name: str,
             positions: frozenset[str] = frozenset()) -> LayerPlan:
    rule = config.resolve(name, type_name, positions)
    if rule is None:
        return LayerPlan(name=name, type=type_name)
    weight = rule.weight if holds_weight(type_name) else None  # adds, pools...: no weight
    return LayerPlan(name=name, type=type_name, weight=weight, input=rule.input,
                     output=rule.output)
