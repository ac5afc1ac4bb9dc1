"""Training through graphopt matches eager step after step: losses and gradients (float32)."""

import pytest
import torch
import torch.nn.functional as F

from graphopt import events
from tests.helpers import assert_training_matches_eager

# float32: graphopt decomposes composite ops and may reassociate reductions.
RTOL, ATOL = 1e-4, 1e-5


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 32),
        torch.nn.ReLU(), torch.nn.Linear(32, 4),
    )


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


def _classification_loss(run, batch):
    x, y = batch
    return F.cross_entropy(run(x), y)


@pytest.mark.parametrize("fusion", [True, False])
def test_mlp_trains_like_eager(fusion):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    assert_training_matches_eager(
        _mlp(), batches, _classification_loss, options={"fusion": fusion}, rtol=RTOL, atol=ATOL
    )


def test_cnn_trains_like_eager():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(3)]
    assert_training_matches_eager(_cnn(), batches, _classification_loss, rtol=RTOL, atol=ATOL)


def test_tiny_gpt2_trains_like_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # dropout off: eager and compiled graphs draw random numbers in different orders
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(config)
    model.config.use_cache = False
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]

    def lm_loss(run, tokens):
        return run(input_ids=tokens, labels=tokens).loss

    assert_training_matches_eager(model, batches, lm_loss, rtol=RTOL, atol=ATOL)


def test_forward_and_backward_both_go_through_graphopt():
    model = torch.compile(_mlp(), backend="graphopt")
    with events.capture() as compiled:
        model(torch.randn(8, 16)).sum().backward()
    kinds = [info.kind for info in compiled]
    assert kinds == ["forward", "backward"]
    assert all(info.records and info.error is None for info in compiled)


def test_no_grad_gets_a_single_inference_graph():
    model = torch.compile(_mlp(), backend="graphopt")
    x = torch.randn(8, 16)
    with torch.no_grad(), events.capture() as compiled:
        out = model(x)
    assert [info.kind for info in compiled] == ["inference"]
    with torch.no_grad():
        torch.testing.assert_close(out, model._orig_mod(x), rtol=RTOL, atol=ATOL)
