"""Reductions across rows recompute the pointwise work they share with a row kernel
(passes/reduction_prologues.py, option recompute_prologues): values equal eager, the row
kernel no longer writes the shared values, and the weight and bias gradients of a layer
norm's backward become one kernel."""

import pytest
import torch
from fusion_helpers import assert_matches, fuse, kernels

from graphopt.options import Options

RECOMPUTE = Options(recompute_prologues=True)
KEEP = Options(recompute_prologues=False)


def _layer_norm_backward(dy_bf16, xhat, rstd, w):
    """A layer norm's backward as autocast's GPT-2 has it: the output gradient comes from a bf16
    matrix product and is cast to fp32; the input gradient's row sums and the weight and bias
    gradients' column sums all read the cast gradient and its product with the normalized input."""
    dy = dy_bf16.float()
    wdy = dy * w
    width = xhat.shape[-1]
    row_sum = wdy.sum(-1, keepdim=True)
    row_dot = (wdy * xhat).sum(-1, keepdim=True)
    dx = rstd / width * (wdy * width - row_sum - xhat * row_dot)
    return dx, (dy * xhat).sum(0), dy.sum(0)


def _inputs(rows=4096, width=32):
    torch.manual_seed(0)
    return (
        torch.randn(rows, width).to(torch.bfloat16),
        torch.randn(rows, width),
        torch.rand(rows, 1) + 0.5,
        torch.randn(width),
    )


def _full_size_outputs(gm, shape):
    return sum(1 for k in kernels(gm) for o in k.primary.spec.outputs if tuple(o.meta["val"].shape) == shape)


# 4096 rows: the column sums are split in two steps; both steps of the two gradients merge
@pytest.mark.parametrize("rows, fewer_kernels", [(64, 1), (4096, 2)])
def test_layer_norm_weight_and_bias_gradients_recompute_and_share_a_kernel(rows, fewer_kernels):
    inputs = _inputs(rows)
    before, _ = fuse(_layer_norm_backward, *inputs, options=KEEP)
    after, report = fuse(_layer_norm_backward, *inputs, options=RECOMPUTE)
    assert len(report.recomputed_prologues) == 2, report.recomputed_prologues
    # the row kernel writes only the input gradient, not the cast gradient and its product
    assert _full_size_outputs(before, (rows, 32)) == 3 and _full_size_outputs(after, (rows, 32)) == 1
    # the two column reductions are one kernel now (when split: both first steps, and both second steps)
    assert len(kernels(after)) == len(kernels(before)) - fewer_kernels
    expected = _layer_norm_backward(*inputs)
    assert_matches(after(*inputs), expected, rtol=1e-4, atol=1e-4)
    assert all(k.failed_reason is None for k in kernels(after))


def test_a_chain_that_reads_a_fusable_reduction_is_left_alone():
    """Its readers would join that reduction's kernel again: nothing to gain."""

    def centered(x):
        c = x - x.mean(-1, keepdim=True)
        return (c * 2).sum(-1), (c * 3).sum(0)

    x = torch.randn(64, 32)
    gm, report = fuse(centered, x, options=RECOMPUTE)
    assert report.recomputed_prologues == []
    assert_matches(gm(x), centered(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("leaves, recomputed", [(2, True), (3, False)])
def test_a_chain_is_recomputed_only_when_its_inputs_cost_no_more_than_its_result(leaves, recomputed):
    """Reading two full-size inputs costs what writing and reading the shared product does; three cost more."""

    def shared_product(*xs):
        product = xs[0]
        for x in xs[1:]:
            product = product * x
        return product.sum(-1), product.sum(0)

    xs = [torch.randn(64, 32) for _ in range(leaves)]
    gm, report = fuse(shared_product, *xs, options=RECOMPUTE)
    assert bool(report.recomputed_prologues) == recomputed
    assert_matches(gm(*xs), shared_product(*xs), rtol=1e-4, atol=1e-4)


def test_on_by_default_and_off_when_asked():
    inputs = _inputs(64)
    _, report = fuse(_layer_norm_backward, *inputs, options=KEEP)
    assert Options().recompute_prologues is True and report.recomputed_prologues == []


def test_symbolic_sizes_recompute_by_their_hints_and_match_eager():
    inputs = _inputs(64)
    gm, report = fuse(_layer_norm_backward, *inputs, dynamic=True, options=RECOMPUTE)
    assert len(report.recomputed_prologues) == 2
    other = _inputs(48)
    assert_matches(gm(*other), _layer_norm_backward(*other), rtol=1e-4, atol=1e-4)


def _channel_statistics(x_bf16):
    """Batch norm's forward on a channels-last activation: per-channel mean and variance over N*H*W
    (reductions across rows in memory, though W is the last logical dim) and the normalized result,
    all of the fp32 cast."""
    x = x_bf16.float()
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return ((x - mean) * torch.rsqrt(var + 1e-5)).to(torch.bfloat16), mean, var


def test_channels_last_per_channel_statistics_recompute_the_cast_instead_of_reading_it():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6).to(torch.bfloat16).to(memory_format=torch.channels_last)
    before, _ = fuse(_channel_statistics, x, options=KEEP)
    after, report = fuse(_channel_statistics, x, options=RECOMPUTE)
    assert report.recomputed_prologues, report
    # the fp32 cast is no longer a kernel of its own, stored for the others to read
    assert (len(kernels(before)), _full_size_outputs(before, (4, 8, 6, 6))) == (3, 2)
    assert (len(kernels(after)), _full_size_outputs(after, (4, 8, 6, 6))) == (2, 1)
    assert_matches(after(x), _channel_statistics(x), rtol=2e-2, atol=2e-2)
