"""One process of tests/test_artifact_cache.py: compile a small MLP through graphopt, run it on
fresh random inputs, and print (as JSON) what was compiled and how far it is from eager.

    python artifact_cache_script.py train|infer [precompile]

`precompile`: under torch's caching precompile, which also keeps what Dynamo traced; the
process saves it at the end (torch.compiler.save_cache_artifacts), as a user does.
"""

import copy
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import graphopt.backend  # noqa: E402
from graphopt.codegen import compiler  # noqa: E402

compiled_kinds = []
compile_graph = graphopt.backend.compile_graph


def counting_compile_graph(gm, example_inputs, kind, *args, **kwargs):
    compiled_kinds.append(kind)
    return compile_graph(gm, example_inputs, kind, *args, **kwargs)


graphopt.backend.compile_graph = counting_compile_graph


def main(mode: str, precompile: bool = False) -> None:
    train = mode == "train"
    if precompile:
        torch._dynamo.config.caching_precompile = True
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="graphopt")
    worst = 0.0
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs in every process
    for _ in range(2):
        x = torch.randn(8, 16)
        with torch.set_grad_enabled(train):
            outs = [compiled(x), eager(x)]
            if train:
                for m, out in zip((model, eager), outs):
                    m.zero_grad()
                    out.square().sum().backward()
        pairs = [(outs[0].detach(), outs[1].detach())]
        if train:
            pairs += [(a.grad, b.grad) for a, b in zip(model.parameters(), eager.parameters())]
        worst = max(worst, *(float((a - b).abs().max() / (1e-5 + b.abs().max())) for a, b in pairs))
    if precompile:
        torch.compiler.save_cache_artifacts()
    print(json.dumps({
        "compiled": compiled_kinds,
        "aot": dict(counters["aot_autograd"]),
        "dynamo_cache": dict(counters["dynamo_cache"]),
        "dynamo_graphs": counters["stats"]["unique_graphs"],  # graphs Dynamo traced in this process
        "kernel_sources": compiler.compiled_sources(),
        "worst_relative_error": worst,
    }))


if __name__ == "__main__":
    main(sys.argv[1], precompile=sys.argv[2:] == ["precompile"])
