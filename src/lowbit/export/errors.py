"""Exporter failures, explained: which module, which op, the exporter's own first line, and
what to try.

torch's exporters fail with long messages (the dynamo exporter's are a page of "next steps"
and a traceback chain). What a user needs is where (the module's qualified name and the op),
why (the exporter's first line and the root cause's first line) and what to try next.
``explain`` reads that from the exception chain: the fx node the dynamo exporter was running
(its ``nn_module_stack`` and target), the TorchScript node being converted (its scope and
kind), or, failing both, the deepest frame whose ``self`` is a submodule of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from torch import nn

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ExportFailure:
    """One exporter's failure, reduced to what a user can act on."""

    exporter: str  # "dynamo" | "torchscript"
    summary: str  # the exporter's first line
    cause: str  # the root cause's first line ("ValueError: Cannot view a tensor ...")
    module: str | None = None  # qualified name in the exported model, with its type
    op: str | None = None  # e.g. "aten.view.default", "lbtest::mystery"
    source: str | None = None  # the user's source line, "file.py:465: code"

    def describe(self) -> str:
        where = []
        if self.module:
            where.append(f"module {self.module}")
        if self.op:
            where.append(f"op {self.op}")
        at = f" at {', '.join(where)}" if where else ""
        src = f" ({self.source})" if self.source else ""
        first = self.summary if self.summary == self.cause else f"{self.summary} {self.cause}"
        return f"{self.exporter} exporter failed{at}{src}: {first}"


class ExportError(RuntimeError):
    """An export step failed for a reason that is not a bad argument (the exporter could not
    trace the model, ONNX Runtime rejected the file...). The message names the step and keeps
    the underlying tool's own message."""


class ExporterError(ExportError):
    """``export_onnx`` could not produce an ONNX file: where each exporter failed and what to
    try. ``failures`` holds one ``ExportFailure`` per exporter tried."""

    def __init__(self, failures: list[ExportFailure], hints: list[str]) -> None:
        self.failures = failures
        self.hints = hints
        lines = ["ONNX export failed."]
        lines += [f"  {f.describe()}" for f in failures]
        lines += ["What to try:"] + [f"  - {h}" for h in hints]
        super().__init__("\n".join(lines))


def first_line(text: str) -> str:
    """The first non-empty line, ANSI colours removed."""
    for line in ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _frames(err: BaseException) -> list[Any]:
    frames = []
    tb: TracebackType | None = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _fx_node(chain: list[BaseException]) -> Any:
    import torch.fx

    for err in reversed(chain):  # the root cause's frames first
        for frame in reversed(_frames(err)):
            for key in ("node", "n"):
                value = frame.f_locals.get(key)
                if isinstance(value, torch.fx.Node):
                    return value
    return None


def _jit_node(chain: list[BaseException]) -> Any:
    import torch

    for err in reversed(chain):
        for frame in reversed(_frames(err)):
            value = frame.f_locals.get("node")
            if isinstance(value, torch._C.Node):
                return value
    return None


def _module_from_frames(chain: list[BaseException], model: nn.Module) -> str | None:
    """The deepest submodule of ``model`` whose ``forward`` is on the failing stack."""
    names = {id(m): (n, type(m).__name__) for n, m in model.named_modules()}
    for err in reversed(chain):
        for frame in reversed(_frames(err)):
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                name, kind = names[id(owner)]
                return f"{name or '<root>'!r} ({kind})"
    return None


def _source_line(stack_trace: str) -> str | None:
    """``file.py:465: code`` from the last frame of an fx node's recorded stack trace."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', stack_trace or "")
    if not frames:
        return None
    path, line, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}: {code.strip()}"


def explain(err: BaseException, exporter: str, model: nn.Module) -> ExportFailure:
    """Reduce an exporter's exception to an ``ExportFailure``."""
    chain = _chain(err)
    root = chain[-1]
    cause = f"{type(root).__name__}: {first_line(str(root))}"
    summary = first_line(str(err))
    if summary.startswith("Failed to") and "This is step" in summary:
        summary = summary.split(" This is step")[0]  # drop the exporter's "next steps"
    module = op = source = None
    node = _fx_node(chain)
    if node is not None:
        op = str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            name, kind = list(stack.values())[-1]
            module = f"{name or '<root>'!r} ({str(kind).rsplit('.', 1)[-1]})"
        source = _source_line(node.meta.get("stack_trace", ""))
    jit = _jit_node(chain) if node is None else None
    if jit is not None:
        op = jit.kind()
        scope = jit.scopeName()  # "__main__.M::/__main__.Odd::odd"
        if scope:
            parts = [p.split("::") for p in scope.split("/")]
            qual = ".".join(p[-1] for p in parts[1:] if len(p) > 1 and p[-1])
            module = f"{qual or '<root>'!r} ({parts[-1][0].rsplit('.', 1)[-1]})"
    if op is None:
        match = re.search(r"operator '?([\w:.]+)'?|target=([\w.:]+)|namespace ([\w:]+)",
                          ANSI.sub("", str(err)) + "\n" + str(root))
        if match:
            op = next(g for g in match.groups() if g)
    if module is None:
        module = _module_from_frames(chain, model)
    return ExportFailure(exporter, summary, cause, module, op, source)


def hints(failures: list[ExportFailure], tried: list[str], opset: int,
          dynamic_shapes: Any) -> list[str]:
    """What to try, the likeliest first, from what failed and what was already tried."""
    text = " ".join(f"{f.summary} {f.cause}" for f in failures).lower()
    out = []
    if "torchscript" not in tried:
        out.append("exporter='torchscript' (the legacy exporter traces the eager model and "
                   "passes many graphs the dynamo exporter rejects)")
    if "dynamo" not in tried:
        out.append("exporter='dynamo'")
    if dynamic_shapes is not None or any(w in text for w in ("constraint", "guard", "symbolic")):
        out.append("dynamic_shapes=None (a fixed-shape export), or mark fewer axes dynamic")
    if any(w in text for w in ("opset", "not supported", "no onnx function", "unsupported")):
        out.append(f"another `opset` (this export used {opset}; lowbit supports 13..23, the "
                   "TorchScript exporter up to 20)")
    out.append("a wrapper module whose forward takes and returns tensors only (e.g. "
               "`return self.model(input_ids=ids).last_hidden_state`)")
    if any(w in text for w in ("shape", "size", "dim")):
        out.append("check that `example_inputs` are what the model's forward takes (shapes, "
                   "dtypes, order)")
    return out
