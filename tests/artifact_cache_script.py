"""One process of tests/test_artifact_cache.py: compile a model through graphopt, run it on fresh
random inputs, and print (as JSON) what was compiled and how far it is from the model in float64.

    python artifact_cache_script.py train|infer [mlp|gpt2|split-sums] [precompile]

mlp (the default): a small MLP in float32. gpt2: a two-layer GPT-2 of transformers, dropout off.
split-sums: the MLP on 4096 rows under bf16 autocast, so that the fusion pass splits the backward's
bias-gradient sums into chunks, adding a view and a prims conversion to the graph (as GPT-2's
training step on a GPU does). `precompile`: under torch's caching precompile, which also keeps
what Dynamo traced; the process saves it at the end (torch.compiler.save_cache_artifacts), as a
user does.
"""

import contextlib
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


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return GPT2LMHeadModel(config)


# model name: (build, fresh inputs, autocast to bf16)
MODELS = {
    "mlp": (_mlp, lambda: torch.randn(8, 16), False),
    "gpt2": (_gpt2, lambda: torch.randint(0, 64, (2, 16)), False),
    "split-sums": (_mlp, lambda: torch.randn(4096, 16), True),
}


def _logits(out):
    return getattr(out, "logits", out)


def main(mode: str, model_name: str = "mlp", precompile: bool = False) -> None:
    train = mode == "train"
    if precompile:
        torch._dynamo.config.caching_precompile = True
    build, make_input, bf16 = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    oracle = copy.deepcopy(model).double()  # not eager: under bf16 autocast, eager strays further
    compiled = torch.compile(model, backend="graphopt")
    worst = 0.0
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs in every process
    for _ in range(2):
        x = make_input()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.set_grad_enabled(train):
            with autocast:
                out = _logits(compiled(x)).float()
            expected = _logits(oracle(x.double() if x.is_floating_point() else x))
        pairs = [(out.detach(), expected.detach())]
        if train:
            for m, o in ((model, out), (oracle, expected)):
                m.zero_grad()
                o.square().sum().backward()
            pairs += [(a.grad, b.grad) for a, b in zip(model.parameters(), oracle.parameters())]
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
    flags = sys.argv[2:]
    model_name = next((f for f in flags if f in MODELS), "mlp")
    main(sys.argv[1], model_name, precompile="precompile" in flags)
