"""Shared test oracles: run a model in eager and through graphopt, compare."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch


def train_steps(
    run: Callable[..., Any],
    model: torch.nn.Module,
    batches: list[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    lr: float,
):
    """SGD steps of `model`'s parameters calling `run` (the model or its compiled wrapper).

    Returns (losses, gradients of the last step by parameter name)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], {}
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(run, batch)
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return torch.stack(losses), grads


def assert_training_matches_eager(
    model: torch.nn.Module,
    batches: list[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    options: dict | None = None,
    rtol: float,
    atol: float,
    lr: float = 0.05,
    dynamic: bool | None = None,
) -> None:
    """Same initial weights, same batches: losses step after step and final gradients must agree."""
    eager_model = copy.deepcopy(model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="graphopt", options=options, dynamic=dynamic)
    eager_losses, eager_grads = train_steps(eager_model, eager_model, batches, loss_fn, lr)
    graphopt_losses, graphopt_grads = train_steps(compiled, compiled_model, batches, loss_fn, lr)
    torch.testing.assert_close(graphopt_losses, eager_losses, rtol=rtol, atol=atol)
    assert graphopt_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(graphopt_grads[name], grad, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
