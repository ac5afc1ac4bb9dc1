"""A standalone repro file for a pass that changes what a graph computes.

The file holds one ATen graph as Python (the pipeline's input graph, or a fused
group's original subgraph), inputs made from its shapes, dtypes and strides, and
the passes up to the culprit, imported by name. It runs the pipeline through the
pass before the culprit and through the culprit on the same inputs and compares
the two: exit status 1 and a message when they differ (reproduced), 0 when not.
"""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from graphopt.options import Options
from graphopt.pipeline import GraphPass


class ReproError(Exception):
    """The graph or a pass cannot be written as a standalone file."""


def _import_line(index: int, name: str, graph_pass: GraphPass) -> str:
    module, qualname = getattr(graph_pass, "__module__", None), getattr(graph_pass, "__qualname__", "")
    found: Any = None
    if module and "<" not in qualname and not module.startswith("__"):
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    if found is not graph_pass:
        raise ReproError(f"pass {name!r} ({module}.{qualname}) cannot be imported by name")
    return f"from {module} import {qualname} as pass_{index}"


def _size(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    if not isinstance(hint, int):
        raise ReproError(f"symbolic size {size} has no value to make inputs with")
    return hint


def _input_expression(node: fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        shape = [_size(s) for s in value.shape]
        stride = [_size(s) for s in value.stride()]
        return f"rand({shape}, {stride}, {value.dtype}, {str(value.device)!r})"
    if isinstance(value, (int, torch.SymInt)):
        return str(_size(value))
    if isinstance(value, (float, bool)):
        return repr(value)
    raise ReproError(f"input {node.name} has no shape information (meta['val'] is {type(value).__name__})")


def _constants(gm: fx.GraphModule) -> list[str]:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, str(node.target))
            if not isinstance(value, torch.Tensor) or value.numel() > 4096:
                raise ReproError(f"graph attribute {node.target} is not a small tensor")
            lines.append(f"self.{node.target} = torch.tensor({value.tolist()!r}, dtype={value.dtype})")
    return lines


def graph_source(gm: fx.GraphModule) -> tuple[str, str]:
    """(import block, class Repro source) for a graph of ATen calls."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = gm.graph.python_code(root_module="self")
    imports = _format_import_block(code.globals, sys_importer)
    init = ["super().__init__()", *_constants(gm)]
    body = "class Repro(torch.nn.Module):\n    def __init__(self):\n"
    body += "".join(f"        {line}\n" for line in init)
    body += textwrap.indent(code.src.strip("\n"), "    ") + "\n"
    return imports, body


_TEMPLATE = '''\
"""graphopt bisect repro: pass {culprit!r} changes what this graph computes.

Found by `graphopt bisect` on {script} ({where}).
Runs graphopt's pipeline through the pass before {culprit!r} and through it, on
the same random inputs, and compares. Exit status 1: reproduced; 0: not.
"""

import sys

import torch
{imports}
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.options import Options
from graphopt.pipeline import PassContext, run_pipeline
{pass_imports}

PASSES = [{passes}]
OPTIONS = Options(**{options!r})
KIND = {kind!r}
RTOL, ATOL = {rtol!r}, {atol!r}


{graph}

def rand(shape, stride, dtype, device):
    """Random values (zeros for integers, so indices stay in range) with exactly this layout."""
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if all(shape) else 0
    if dtype.is_floating_point or dtype.is_complex:
        flat = torch.randn(extent, device=device).to(dtype)
    elif dtype == torch.bool:
        flat = torch.rand(extent, device=device) > 0.5
    else:
        flat = torch.zeros(extent, dtype=dtype, device=device)
    return flat.as_strided(shape, stride)


def make_inputs():
    torch.manual_seed(0)
    return [{inputs}]


def main():
    inputs = make_inputs()
    gm = make_fx(Repro())(*inputs)  # the ATen graph with shapes in meta['val'], as graphopt receives it
    placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    ctx = PassContext(OPTIONS, "repro", KIND, placeholders, torch.device({device!r}))
    before = run_pipeline(gm, ctx, PASSES[:-1]).gm(*inputs)
    after = run_pipeline(gm, ctx, PASSES).gm(*inputs)
    try:
        torch.testing.assert_close(after, before, rtol=RTOL, atol=ATOL, equal_nan=True)
    except AssertionError as e:
        print("reproduced: pass {culprit!r} changes the result:", str(e).strip().splitlines()[0])
        return 1
    print("not reproduced: the results agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def repro_source(
    gm: fx.GraphModule,
    passes: Sequence[tuple[str, GraphPass]],
    *,
    options: Options,
    kind: str,
    device: torch.device,
    rtol: float,
    atol: float,
    script: str,
    where: str,
) -> str:
    """The repro file's text: `gm` through `passes`, the last of which is the culprit."""
    imports, graph = graph_source(gm)
    inputs = [_input_expression(n) for n in gm.graph.nodes if n.op == "placeholder"]
    pass_imports = [_import_line(i, name, fn) for i, (name, fn) in enumerate(passes)]
    return _TEMPLATE.format(
        culprit=passes[-1][0],
        script=script,
        where=where,
        imports=imports,
        pass_imports="\n".join(pass_imports),
        passes=", ".join(f"({name!r}, pass_{i})" for i, (name, _) in enumerate(passes)),
        options=options.as_dict(),
        kind=kind,
        rtol=rtol,
        atol=atol,
        graph=graph,
        inputs=", ".join(inputs),
        device=str(device),
    )
