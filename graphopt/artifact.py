"""A compiled graph as an inductor `OutputCode`, the form torch's AOTAutograd cache keeps.

With `torch._functorch.config.bundled_autograd_cache`, torch pickles the compilers'
OutputCode objects into its cache entry whole (graphopt/artifact_cache.py says when
graphopt asks for that). A CompiledGraph does not pickle as is: its kernel nodes'
targets (GuardedCall -> FusedKernel) hold codegen plans full of fx.Nodes. Its
picklable form is the final graph with each kernel node turned into a call of its
eager fallback subgraph (a submodule named after the kernel), written by torch's
GraphPickler with the meta['val'] of the subgraphs' nodes (the shapes, strides, dtypes
and size symbols codegen plans from) and of the graph's inputs (the runtime reads
those), not of the graph's other nodes. Loading plans each subgraph again and makes its
kernel as the fusion pass did (`fusion.kernel_call`); Triton's own on-disk cache
keeps the kernel compiles cheap.

Kernels built alike (the same structure, `fusion_plans.structure`: one per transformer
layer) are written as one subgraph and made into one FusedKernel on load, which their
nodes share under their own names: GPT-2 training keeps 44 subgraphs for its 479
kernels, so a warm compile unpickles, plans and writes a launcher 44 times instead of
479, and its first step renders and launches through Triton's JIT 44 kernels. A shared
kernel counts the launches of all its nodes.

Loading happens while torch unpickles the entry, so an entry that cannot be loaded
(corrupt, or made by another graphopt) fails there: torch then skips it, compiles
the graph as usual and stores a fresh entry next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any

import torch
from torch import fx
from torch._inductor.output_code import OutputCode
from torch.fx._lazy_graph_module import _LazyGraphModule

from graphopt.cache import CacheWarning
from graphopt.passes.fusion import kernel_call
from graphopt.passes.fusion_plans import Plans, structure
from graphopt.pipeline import copy_graph_module
from graphopt.runtime import CompiledGraph, GuardedCall


@dataclasses.dataclass
class GraphoptOutputCode(OutputCode):
    """One CompiledGraph, called with AOTAutograd's boxed convention; pickles as its graph's bytes."""

    name: str = ""
    cuda_graphs: bool = False
    cuda_device: str | None = None  # the CompiledGraph's: its saved graph keeps meta only on its inputs
    compiled: CompiledGraph | None = None
    payload: bytes | None = None  # GraphPickler bytes of the picklable graph; set only on the copy torch saves
    not_kept: str | None = None  # why torch's cache must not keep this graph's entry (graphopt/artifact_cache.py)
    digest: str = ""  # sha256 of payload: a damaged entry is caught before it is unpickled

    def __post_init__(self) -> None:
        self._boxed_call = True

    def __call__(self, inputs: list[Any]) -> Any:
        return self.compiled(inputs)

    def prepare_for_serialization(self) -> None:
        """Runs on the copy torch pickles (the live one keeps running)."""
        if self.not_kept is not None:
            from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache

            raise BypassAOTAutogradCache(self.not_kept)
        try:
            self.payload = _dumps(self.compiled.gm)
        except Exception as e:  # torch then skips the entry; the compile itself is unaffected
            warnings.warn(f"graphopt: compiled graph {self.name} not kept in torch's AOTAutograd cache: {e}", CacheWarning)
            raise
        self.digest = hashlib.sha256(self.payload).hexdigest()
        self.compiled = None

    def __copy__(self) -> GraphoptOutputCode:
        """A plain copy (torch copies the result before preparing it for pickling); without this,
        copy.copy would go through __setstate__, which loads."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphoptOutputCode:
        """The same plain copy: its graph's bytes never change and a CompiledGraph is not mutated after
        compiling, so both are shared. torch deep-copies entries under its precompile
        (`torch._dynamo.config.caching_precompile`), the saved form inside `no_dispatch()`, where
        loading through __setstate__ cannot make fake tensors: the entry was not kept at all."""
        return self.__copy__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        try:
            if hashlib.sha256(self.payload).hexdigest() != self.digest:
                raise ValueError("its bytes do not match their checksum")
            gm = _loads(self.payload)
        except Exception as e:
            warnings.warn(
                f"graphopt: cannot load compiled graph {self.name} from torch's AOTAutograd cache "
                f"({type(e).__name__}: {e}); compiling it again",
                CacheWarning,
            )
            raise
        device = torch.device(self.cuda_device) if self.cuda_device is not None else None
        self.compiled = CompiledGraph(gm, self.name, cuda_graphs=self.cuda_graphs, cuda_device=device)
        self.payload = None

    def post_compile(self, example_inputs: Any, constants: Any, graph_kwargs: Any) -> None:
        """Nothing left to do: unpickling made the graph and its kernels."""

    def set_triton_bundle(self, triton_bundle: Any) -> None:
        """graphopt's kernels come back through Triton's own cache, not a bundle."""


def output_code(compiled: CompiledGraph, not_kept: str | None = None) -> GraphoptOutputCode:
    device = str(compiled.cuda_device) if compiled.cuda_device is not None else None
    return GraphoptOutputCode(
        name=compiled.name,
        cuda_graphs=compiled.cuda_graph is not None,
        cuda_device=device,
        compiled=compiled,
        not_kept=not_kept,
    )


class _Held(torch.nn.Module):
    """A target of graphopt's own in a graph being pickled, held as a submodule (GraphPickler names
    only torch's and Python's functions): a kernel as its name and its fallback subgraph, from which
    codegen makes it again on load; any other (a planned view) as itself, which must pickle.

    `alike`: the fallback subgraphs held so far, by structure; a kernel built like one of them
    holds that one, so the pickle writes it once."""

    def __init__(self, target: Any, alike: dict[tuple[Any, ...], fx.GraphModule]):
        super().__init__()
        self.kernel_name = target.__name__ if isinstance(target, GuardedCall) else None
        self.fallback = _shared_fallback(target.fallback, alike) if isinstance(target, GuardedCall) else None
        self.target = None if isinstance(target, GuardedCall) else target

    def restore(self, plans: Plans, made: dict[int, GuardedCall]) -> Any:
        """The node's target; `made`: the kernels made so far, by their fallback subgraph's id."""
        if self.kernel_name is None:
            return self.target
        first = made.get(id(self.fallback))
        if first is not None:  # built alike: the same kernel and fallback, under this node's name
            return GuardedCall(self.kernel_name, first.primary, first.fallback)
        fallback = _LazyGraphModule.from_graphmodule(self.fallback)
        made[id(self.fallback)] = kernel_call(self.kernel_name, fallback, plans)
        return made[id(self.fallback)]


def _shared_fallback(fallback: fx.GraphModule, alike: dict[tuple[Any, ...], fx.GraphModule]) -> fx.GraphModule:
    """The first fallback subgraph held that is built like `fallback` (the same ops, arguments,
    values and calling convention), else `fallback` itself."""
    key = _fallback_structure(fallback)
    return fallback if key is None else alike.setdefault(key, fallback)


def _fallback_structure(fallback: fx.GraphModule) -> tuple[Any, ...] | None:
    """What a fallback subgraph computes and how it is called, None if it cannot be described exactly:
    its placeholders in order (its arguments), its nodes, and which of them it returns, how."""
    nodes = list(fallback.graph.nodes)
    if any(n.op not in ("placeholder", "call_function", "output") for n in nodes):
        return None
    inputs = [n for n in nodes if n.op == "placeholder"]
    members = [n for n in nodes if n.op == "call_function"]
    (output,) = (n for n in nodes if n.op == "output")
    result = output.args[0]
    outputs = list(result) if isinstance(result, tuple) else [result]
    key = structure(inputs, members, outputs)
    return None if key is None else (key, isinstance(result, tuple))


def _dumps(gm: fx.GraphModule) -> bytes:
    """GraphPickler bytes of `gm`, graphopt's own targets held as submodules named after their nodes."""
    from torch.fx._graph_pickler import GraphPickler, Options

    picklable = copy_graph_module(gm)
    graph = picklable.graph
    alike: dict[tuple[Any, ...], fx.GraphModule] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and type(node.target).__module__.startswith("graphopt."):
            picklable.add_submodule(node.name, _Held(node.target, alike))
            _replace(graph, node, "call_module", node.name)
        if node.op != "placeholder":
            # nothing reads a compiled graph's inner values again (kernels are planned from their own
            # subgraphs' meta, held whole), and their fake tensors are most of the bytes and of the load
            node.meta.pop("val", None)
    # every op namespace, not only aten (torch's default filter): passes add prims ops (fusion's split
    # reductions convert their fp32 partial sums back), and an op that is gone when loading fails the
    # load, which compiles the graph again
    return GraphPickler.dumps(picklable, Options(ops_filter=None, node_metadata_key_filter=_kept_meta))


def _kept_meta(key: str) -> bool:
    """Only meta['val'] is read after compiling (by codegen, of kernel subgraphs, and by the runtime, of
    the graph's inputs); the rest need not pickle."""
    return key == "val"


def _loads(payload: bytes) -> fx.GraphModule:
    """The graph `_dumps` wrote, with its targets back (one kernel per subgraph written)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with unset_fake_temporarily():  # the values get a fake mode of their own, never the caller's
        gm = GraphPickler.loads(payload, FakeTensorMode(shape_env=ShapeEnv()))
    plans = Plans()
    made: dict[int, GuardedCall] = {}
    for node in list(gm.graph.find_nodes(op="call_module")):
        held = gm.get_submodule(node.target)
        if isinstance(held, _Held):
            _replace(gm.graph, node, "call_function", held.restore(plans, made))
            gm.delete_submodule(node.target)
    return _LazyGraphModule.from_graphmodule(gm)  # its code is generated if it is ever run or read, as a compiled one's


def _replace(graph: fx.Graph, node: fx.Node, op: str, target: Any) -> None:
    """`node` replaced by an `op` node of `target` with the same inputs and meta."""
    with graph.inserting_before(node):
        new = graph.create_node(op, target, node.args, node.kwargs)
    new.meta = node.meta
    node.replace_all_uses_with(new)
    graph.erase_node(node)
