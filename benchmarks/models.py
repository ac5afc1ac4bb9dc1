"""The benchmark model suite of ../shared/BENCHMARKING.md: real definitions, random weights.

Each entry builds its model on a device with a fixed seed and draws inputs from a
seed, so every backend of a run sees the same weights and the same batches, and
nothing is ever downloaded. transformers, torchvision and timm are imported inside
the builders: the GPU image has all three, a CPU checkout may have none, and the
`tiny` and `mlp` models need only torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model and its inputs.

    `build(device)` returns the model (fp32 parameters, train mode, seeded weights);
    `inputs(seed, device)` returns the positional arguments of one call;
    `modules` are what `build` imports, which a benchmark process may import ahead.
    """

    name: str
    description: str
    input_description: str
    build: Callable[[torch.device], nn.Module]
    inputs: Callable[[int, torch.device], tuple[torch.Tensor, ...]]
    modules: tuple[str, ...] = ()


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model's output: a tensor, a transformers ModelOutput, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _seeded_build(make: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """Initialise on the target device (fast on a GPU) with a fixed seed."""
    torch.manual_seed(0)
    with torch.device(device):
        model = make()
    return model.to(device).train()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _tokens(batch: int, length: int, vocab: int) -> Callable[[int, torch.device], tuple[torch.Tensor, ...]]:
    def inputs(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, vocab, (batch, length), device=device, generator=_generator(seed, device)),)

    return inputs


def _normal(*shape: int) -> Callable[[int, torch.device], tuple[torch.Tensor, ...]]:
    def inputs(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (torch.randn(shape, device=device, generator=_generator(seed, device)),)

    return inputs


class ResidualMLPBlock(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))): the transformer feed-forward block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


def residual_mlp(blocks: int, dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(*(ResidualMLPBlock(dim, hidden) for _ in range(blocks)))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, use_cache=False, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=2048,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _vit() -> nn.Module:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "gpt2",
            "transformers GPT2LMHeadModel, 12 layers, n_embd 768, 12 heads",
            "tokens 8 x 1024",
            lambda device: _seeded_build(_gpt2, device),
            _tokens(8, 1024, 50257),
            ("transformers.models.gpt2.modeling_gpt2",),
        ),
        ModelSpec(
            "llama",
            "transformers LlamaForCausalLM, hidden 1024, inter 2816, 8 layers, 16 heads, 8 kv heads",
            "tokens 4 x 2048",
            lambda device: _seeded_build(_llama, device),
            _tokens(4, 2048, 32000),
            ("transformers.models.llama.modeling_llama",),
        ),
        ModelSpec(
            "resnet50",
            "torchvision resnet50",
            "images 64 x 3 x 224 x 224",
            lambda device: _seeded_build(_resnet50, device),
            _normal(64, 3, 224, 224),
            ("torchvision.models",),
        ),
        ModelSpec(
            "vit",
            "timm vit_base_patch16_224",
            "images 64 x 3 x 224 x 224",
            lambda device: _seeded_build(_vit, device),
            _normal(64, 3, 224, 224),
            ("timm",),
        ),
        ModelSpec(
            "mlp",
            "8 blocks of LayerNorm -> Linear(1024, 4096) -> GELU -> Linear(4096, 1024) + residual",
            "16 x 512 x 1024",
            lambda device: _seeded_build(lambda: residual_mlp(8, 1024, 4096), device),
            _normal(16, 512, 1024),
        ),
        ModelSpec(
            "tiny",
            "2 blocks of LayerNorm -> Linear(32, 64) -> GELU -> Linear(64, 32) + residual (CPU tests)",
            "4 x 8 x 32",
            lambda device: _seeded_build(lambda: residual_mlp(2, 32, 64), device),
            _normal(4, 8, 32),
        ),
    ]
}

# The models of BENCHMARKING.md: what `python -m benchmarks.run` measures unless told otherwise.
SUITE: tuple[str, ...] = ("gpt2", "llama", "resnet50", "vit", "mlp")


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}") from None
