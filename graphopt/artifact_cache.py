"""Compiling through torch's AOTAutograd cache: a new process that compiles a graph compiled
before (same model, inputs, options, tuning-cache folder) loads the result instead.

With the tuning cache full, about two thirds of a compile is AOTAutograd's own work
(tracing the joint graph, functionalization, the partition), which only a cached
AOTAutograd result skips. torch keeps one when the forward compiler is a
SerializableAOTDispatchCompiler and every compiler returns an OutputCode that pickles
whole (`bundled_autograd_cache`; graphopt/artifact.py makes CompiledGraph one). The
backward is compiled with the forward, not at the first backward call
(`force_non_lazy_backward_lowering`), so the entry is written while these settings
hold; torch's precompile sets the same two.

torch's key covers the Dynamo graph, the inputs' metadata, torch's version and its
configs, but not the compilers. What graphopt's result also depends on goes into it
through `torch.compiler.config.cache_key_tag`: graphopt's version and source, the
options, the device, whether kernels can run here, and the tuning cache's folder and
generation, so a new folder, a cleared cache or one imported into starts cold, as the
tuning cache does.

Not used when a compile must really run: `debug_dir` asks for every pass's records,
something listens to compiles (graphopt.events: the CLI, tests), or bisect selects
passes. A graph with an output that is a view of another value (an input, an intermediate,
another output) is compiled but not kept: torch replays such views wrongly after loading
(`_replayed_aliases`). torch's switches turn it off (TORCHINDUCTOR_AUTOGRAD_CACHE=0,
torch.compiler.config.force_disable_caches). A torch without these APIs compiles as
before, with one warning.

What a warm process still does is Dynamo's tracing. torch's caching precompile keeps that
too (`torch._dynamo.config.caching_precompile`, or TORCH_CACHING_PRECOMPILE=1, then
`torch.compiler.save_cache_artifacts()` after compiling): the next process installs the
saved bytecode, guards and these same entries at torch.compile, tracing nothing. It works
with graphopt's entries (tests/test_artifact_cache.py) but graphopt does not turn it on: it
is global and experimental in torch, its key is the function's name and line only (not the
backend, graphopt's options or version: a changed option loads the old graph), it drops
identity guards, and a graph break in code it cannot name (a property's function) is an
error, not a fallback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

from graphopt import events, pipeline
from graphopt.cache import DEBUG_ONLY_OPTIONS, CacheWarning, default_cache_dir, device_name, generation, source_digest
from graphopt.options import Options
from graphopt.runtime import CompiledGraph


@functools.lru_cache(maxsize=1)
def missing_api() -> str | None:
    """What this torch lacks for keeping compiled graphs, or None."""
    try:
        # bundles any OutputCode, not only inductor's CompiledFxGraph
        from torch._functorch._aot_autograd.aot_autograd_result import BundledOutputCodeLoadable  # noqa: F401
        from torch._functorch._aot_autograd.autograd_cache import should_use_local_autograd_cache  # noqa: F401
        from torch._functorch.aot_autograd import SerializableAOTDispatchCompiler  # noqa: F401
        from torch._inductor.output_code import OutputCode  # noqa: F401
        from torch.compiler import config as compiler_config
        from torch.fx._graph_pickler import GraphPickler  # noqa: F401
    except ImportError as e:
        return str(e)
    for config, name in (
        (torch._functorch.config, "bundled_autograd_cache"),
        (torch._functorch.config, "force_non_lazy_backward_lowering"),
        (compiler_config, "cache_key_tag"),
    ):
        if not hasattr(config, name):
            return f"{config.__name__}.{name} does not exist"
    return None


@functools.lru_cache(maxsize=None)
def _warn_missing(reason: str) -> None:
    warnings.warn(f"graphopt: compiled graphs are not cached with torch {torch.__version__}: {reason}", CacheWarning)


def wanted(options: Options) -> bool:
    """Whether this compile goes through torch's AOTAutograd cache (see the module doc)."""
    if options.debug_dir or events.listening() or pipeline.passes_selected():
        return False
    missing = missing_api()
    if missing is not None:
        _warn_missing(missing)
        return False
    from torch._functorch._aot_autograd.autograd_cache import should_use_local_autograd_cache

    return should_use_local_autograd_cache()


def _tag(options: Options, device: torch.device) -> str:
    """What graphopt's compiled graphs depend on beyond torch's key, hashed."""
    import triton

    import graphopt
    from graphopt.codegen import compiler

    material = (
        graphopt.__version__,
        source_digest(),
        triton.__version__,
        sorted((k, repr(v)) for k, v in options.as_dict().items() if k not in DEBUG_ONLY_OPTIONS),
        os.path.abspath(default_cache_dir(options)),
        generation(options),
        device_name(device),
        compiler.can_run_on(device),
    )
    return hashlib.sha256(repr(material).encode()).hexdigest()[:32]


@contextlib.contextmanager
def caching(options: Options, device: torch.device) -> Iterator[None]:
    """torch's settings for keeping and finding graphopt's compiled graphs, around one aot_autograd call."""
    from torch.compiler import config as compiler_config

    tag = f"{compiler_config.cache_key_tag}graphopt-{_tag(options, device)}"
    with (
        torch._functorch.config.patch(bundled_autograd_cache=True, force_non_lazy_backward_lowering=True),
        compiler_config.patch(cache_key_tag=tag),
    ):
        yield


def serializable(compile_fn: Callable[[fx.GraphModule, Any], CompiledGraph]) -> Callable[..., Any]:
    """`compile_fn` as a compiler whose results torch's AOTAutograd cache can keep."""
    from torch._functorch.aot_autograd import SerializableAOTDispatchCompiler

    from graphopt.artifact import GraphoptOutputCode, output_code

    return SerializableAOTDispatchCompiler(
        GraphoptOutputCode, lambda gm, inputs: output_code(compile_fn(gm, inputs), _replayed_aliases())
    )


def _replayed_aliases() -> str | None:
    """Why the graph AOTAutograd is compiling must not be kept: outputs that alias another value are
    rebuilt at run time by replaying their views (ViewMeta sequences) on it, and the sequences torch's
    cache loads back replay to garbage sizes (torch 2.11 and 2.13, inductor alike: a training model
    returning `logits, logits.view(-1, n)` fails its second compile; pytorch/pytorch#177812)."""
    from torch._guards import TracingContext

    tracing = TracingContext.try_get()
    meta = getattr(tracing, "fw_metadata", None)
    if meta is None or not any(getattr(info, "view_meta_sequence", None) is not None for info in meta.output_info):
        return None
    return "graphopt: outputs that alias another value are rebuilt by view replay, which fails after a cache load"
