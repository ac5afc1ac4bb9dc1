"""Real architectures on the CPU: one training step through graphopt equals eager.

Tiny configurations with random weights (nothing is downloaded): GPT-2, Llama, Mistral,
BERT, T5, ViT, two Mixture-of-Experts models (Mixtral, Qwen2-MoE) and a plain-torch CNN
with batch norm. Each runs forward and backward under the pass options that exist when
the test runs (every boolean option of graphopt/options.py, and memory_budget 1.0 / 0.3
if that option exists): every combination for GPT-2, Llama and the CNN, a pairwise
covering subset for the others. The loss and every parameter gradient must match eager's. Dropout is off: eager and compiled graphs draw random
numbers in different orders.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt import events
from graphopt.cost_model.roofline import CPU_SPEC
from graphopt.options import Options
from graphopt.passes import conv_layout, pad_matmul

transformers = pytest.importorskip("transformers")

# float32. graphopt decomposes composite ops (layer norm, softmax, ...) into primitives and
# generated kernels reassociate reductions, so values differ from eager in the last bits;
# through two layers and a backward that grows to ~1e-5 absolute on O(1) gradients.
RTOL, ATOL = 1e-4, 2e-5
# Options that trade accuracy for memory (activations stored in bf16/fp8): each gradient must
# stay within this relative distance of eager's (in norm), the loss within LOSSY_RTOL.
LOSSY_OPTIONS = {"remat_compress"}
LOSSY_RTOL = 2e-2
# Options with nothing to do on the CPU this suite runs on (checked once, on GPT-2, below).
CUDA_ONLY_OPTIONS = {"cuda_graphs", "pad_matmuls", "channels_last"}  # their own tests force the last two on the CPU
# Options that act only on the casts of mixed precision, of which these float32 steps make none
# (checked under autocast, below).
MIXED_PRECISION_OPTIONS = {"batch_casts"}
# Options that act only on training batch norm, or on the write-backs of inputs a graph updates (of these
# models, batch norm's running statistics only): checked on the CNN, below.
BATCH_NORM_OPTIONS = {"fuse_batch_norm", "batch_write_backs"}


def option_combinations() -> list[dict[str, Any]]:
    """Every combination of the boolean options, and memory_budget 1.0 / 0.3 if it exists."""
    fields = {f.name: f for f in dataclasses.fields(Options)}
    axes: dict[str, list[Any]] = {
        name: [True, False] for name, f in fields.items() if isinstance(f.default, bool) and name not in CUDA_ONLY_OPTIONS | MIXED_PRECISION_OPTIONS | BATCH_NORM_OPTIONS
    }
    if "memory_budget" in fields:
        axes["memory_budget"] = [1.0, 0.3]
    names = sorted(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def pairwise(combinations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A subset of `combinations` in which every pair of values of any two options still occurs
    (greedy covering array): most option bugs need two options to show, and it is far cheaper."""
    def pairs(combo):
        items = sorted(combo.items())
        return {(a, b) for a, b in itertools.combinations(items, 2)} or {tuple(items)}

    uncovered = set().union(*(pairs(c) for c in combinations))
    chosen = []
    while uncovered:
        best = max(combinations, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def _tokens(vocab: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def _causal_lm(run: Callable[..., Any], tokens: torch.Tensor) -> torch.Tensor:
    return run(input_ids=tokens, labels=tokens).loss


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]
    loss: Callable[[Callable[..., Any], Any], torch.Tensor]


def _gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16, use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def _mistral():
    config = transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16, sliding_window=4, use_cache=False,
    )
    return transformers.MistralForCausalLM(config)


def _mixtral():
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=64, max_position_embeddings=16, use_cache=False,
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe():
    config = transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        vocab_size=64, max_position_embeddings=16, use_cache=False,
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _bert():
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(config)


def _masked_lm(run, tokens):
    labels = torch.where(torch.arange(tokens.shape[1]) % 3 == 0, tokens, -100)
    return run(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=labels).loss


def _t5():
    config = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=64,
        relative_attention_num_buckets=8, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def _seq2seq(run, batch):
    source, target = batch
    return run(input_ids=source, labels=target).loss


def _vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTModel(config)


def _vit_loss(run, images):
    out = run(pixel_values=images)
    return out.last_hidden_state.square().mean() + out.pooler_output.sum()


def _cnn():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, 8), nn.MaxPool2d(2), block(8, 16), block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 5),
    )


def _classification(run, batch):
    images, labels = batch
    return F.cross_entropy(run(images), labels)


ARCHS = [
    Arch("gpt2", _gpt2, lambda: _tokens(64), _causal_lm),
    Arch("llama", _llama, lambda: _tokens(64), _causal_lm),
    Arch("mistral", _mistral, lambda: _tokens(64), _causal_lm),
    Arch("mixtral_moe", _mixtral, lambda: _tokens(64), _causal_lm),
    Arch("qwen2_moe", _qwen2_moe, lambda: _tokens(64), _causal_lm),
    Arch("bert", _bert, lambda: _tokens(64), _masked_lm),
    Arch("t5", _t5, lambda: (_tokens(64), _tokens(64, length=6)), _seq2seq),
    Arch("vit", _vit, lambda: torch.randn(2, 3, 16, 16), _vit_loss),
    Arch("cnn", _cnn, lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))), _classification),
]


def _step(run: Callable[..., Any], model: nn.Module, batch: Any, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_fn(run, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_step_matches(arch: Arch, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = arch.build().train()
    batch = arch.batch()
    eager_model, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="graphopt", options=options)

    eager_loss, eager_grads = _step(eager_model, eager_model, batch, arch.loss)
    with events.capture() as graphs:
        loss, grads = _step(compiled, compiled_model, batch, arch.loss)

    kinds = {info.kind for info in graphs}
    assert {"forward", "backward"} <= kinds, f"graphopt compiled {sorted(kinds)}: the step did not go through it"
    assert all(info.error is None for info in graphs), [str(info.error) for info in graphs if info.error]
    assert grads.keys() == eager_grads.keys()
    if any(options.get(name) for name in LOSSY_OPTIONS):
        torch.testing.assert_close(loss, eager_loss, rtol=LOSSY_RTOL, atol=0.0)
        for name, grad in eager_grads.items():
            # in norm, with an absolute floor: some gradients are zero up to rounding (a key bias
            # under softmax), where any relative measure is noise
            distance, allowed = (grads[name] - grad).norm(), LOSSY_RTOL * grad.norm() + ATOL * grad.numel() ** 0.5
            assert distance <= allowed, f"grad of {name}: distance {distance:.3g} to eager's, allowed {allowed:.3g}"
        return
    torch.testing.assert_close(loss, eager_loss, rtol=RTOL, atol=ATOL)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")
    for name, buffer in eager_model.named_buffers():  # batch-norm running statistics
        torch.testing.assert_close(dict(compiled_model.named_buffers())[name], buffer, rtol=RTOL, atol=ATOL)


# Every option combination on these; the others (slower to compile) get the pairwise subset.
FULL_PRODUCT = {"gpt2", "llama", "cnn"}


def _cases() -> list[Any]:
    every = option_combinations()
    return [
        pytest.param(arch, options, id=f"{arch.name}-" + ",".join(f"{k}={v}" for k, v in options.items()))
        for arch in ARCHS
        for options in (every if arch.name in FULL_PRODUCT else pairwise(every))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("arch, options", _cases())
def test_training_step_matches_eager(arch: Arch, options: dict[str, Any]):
    _assert_step_matches(arch, options)


@pytest.mark.parametrize("name", sorted(BATCH_NORM_OPTIONS & {f.name for f in dataclasses.fields(Options)}))
@pytest.mark.parametrize("options", pairwise(option_combinations()), ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_batch_norm_options_keep_a_cnn_step_and_its_running_statistics_exact(options: dict[str, Any], name: str):
    """Loss, gradients and the running statistics the step updates match eager's (pairwise over the other options)."""
    _assert_step_matches(next(a for a in ARCHS if a.name == "cnn"), {**options, name: True})


@pytest.mark.parametrize("name", sorted(CUDA_ONLY_OPTIONS & {f.name for f in dataclasses.fields(Options)}))
def test_cuda_only_options_change_nothing_on_the_cpu(name):
    _assert_step_matches(ARCHS[0], {name: True})


# A device on which the CUDA-only rewrites act: every misaligned matrix product is worth padding
# (passes/pad_matmul.py) and convolutions run channels-last (passes/conv_layout.py).
CUDA_LIKE_SPEC = dataclasses.replace(
    CPU_SPEC,
    matmul_flops_per_s=1.0,
    fp32_matmul_flops_per_s=1.0,
    misaligned_matmul_slowdown=4.0,
    channels_last_convolutions=True,
)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_cuda_only_rewrites_forced_on_the_cpu_keep_every_architecture_exact(arch: Arch, monkeypatch):
    monkeypatch.setattr(pad_matmul, "device_spec", lambda device: CUDA_LIKE_SPEC)
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CUDA_LIKE_SPEC)
    _assert_step_matches(arch, {})


def test_batch_norm_options_on_channels_last_activations_keep_a_cnn_step_exact(monkeypatch):
    """As on CUDA, where batch norm's per-channel sums run across rows of channels-last activations."""
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CUDA_LIKE_SPEC)
    _assert_step_matches(next(a for a in ARCHS if a.name == "cnn"), {name: True for name in BATCH_NORM_OPTIONS})


def _autocast_step(arch: Arch, options: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[Any]]:
    torch.manual_seed(0)
    model = arch.build().train()
    batch = arch.batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="graphopt", options=options)
    with events.capture() as graphs, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _step(compiled, model, batch, arch.loss)
    return loss, grads, graphs


@pytest.mark.parametrize("name", sorted(MIXED_PRECISION_OPTIONS & {f.name for f in dataclasses.fields(Options)}))
@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in {"gpt2", "llama", "t5", "vit", "cnn"}], ids=lambda a: a.name)
def test_mixed_precision_options_change_no_bit_of_an_autocast_step(arch: Arch, name: str):
    """They only change how casts are launched: loss and gradients equal the option's absence bit for bit."""
    loss_off, grads_off, _ = _autocast_step(arch, {name: False})
    loss_on, grads_on, graphs = _autocast_step(arch, {name: True})
    assert any(r.name == "batch_casts" and r.report.batched for g in graphs for r in g.records)
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys()
    for key, grad in grads_off.items():
        assert torch.equal(grads_on[key], grad), key
