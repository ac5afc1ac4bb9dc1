"""GPU microbenchmark of graphopt's generated kernels: eager vs inductor vs graphopt.

Memory-bound cases (a long elementwise chain, softmax, layer norm forward and
forward+backward) at sizes that stream hundreds of MB, so achieved bandwidth is
the figure of merit: GB/s = bytes that must move (inputs read once, outputs
written once) / median time, next to the device's measured copy bandwidth.
Every graphopt result is checked against eager first, and the run fails if a
generated kernel fell back to ATen.

    python benchmarks/micro_kernels.py --out DIR [--quick]

Writes DIR/micro_kernels.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _time_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _captured_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float | None:
    """Median time of `fn` replayed from a CUDA graph: the kernels alone, without launch overhead."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - some callables cannot be recorded; the row says so
        print(f"  (no CUDA-graph timing: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None
    return _time_ms(graph.replay, warmup, reps)


def copy_bandwidth_gbs(numel: int) -> float:
    x = torch.empty(numel, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), 5, 30)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def _chain(x, y, z):
    return (torch.sigmoid(F.gelu(x * 1.5 + y) * z) + x * 0.5).tanh()


def _softmax(x):
    return torch.softmax(x, dim=-1)


def _layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)


def _column_sum(g):
    """A linear layer's bias gradient under autocast: bf16 rows summed into fp32 columns."""
    return g.sum(0, dtype=torch.float32)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases(quick: bool) -> list[dict[str, Any]]:
    scale = 8 if quick else 1
    dev = "cuda"
    out: list[dict[str, Any]] = []
    for dtype in (torch.float32, torch.bfloat16):
        n = (64 * 2**20) // scale
        x, y, z = (torch.randn(n, device=dev, dtype=dtype) for _ in range(3))
        out.append(dict(name=f"elementwise_chain_{n}_{str(dtype)[6:]}", fn=_chain, inputs=(x, y, z), grad=False,
                        bytes=_nbytes(x, y, z, x)))
    for rows, cols in ((32768 // scale, 1024), (4096 // scale, 32000)):
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        out.append(dict(name=f"softmax_{rows}x{cols}_bf16", fn=_softmax, inputs=(x,), grad=False, bytes=2 * _nbytes(x)))
    # (8192, 768): GPT-2 small's training step (8 x 1024 tokens), whose LN backward trails inductor's
    for rows, cols in ((32768 // scale, 1024), (8192 // scale, 4096), (8192 // scale, 768)):
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        w = torch.randn(cols, device=dev, dtype=torch.bfloat16)
        b = torch.randn(cols, device=dev, dtype=torch.bfloat16)
        out.append(dict(name=f"layer_norm_fwd_{rows}x{cols}_bf16", fn=_layer_norm, inputs=(x, w, b), grad=False,
                        bytes=2 * _nbytes(x)))
        # forward + backward: fwd reads x, writes y (+ row stats); bwd reads x, dy, writes dx (+ dw, db)
        out.append(dict(name=f"layer_norm_fwd_bwd_{rows}x{cols}_bf16", fn=_layer_norm, inputs=(x, w, b), grad=True,
                        bytes=5 * _nbytes(x)))
    for cols in (768, 2304, 3072):  # GPT-2's bias gradients: few long columns, a split reduction
        g = torch.randn(8192 // scale, cols, device=dev, dtype=torch.bfloat16)
        out.append(dict(name=f"column_sum_{8192 // scale}x{cols}_bf16", fn=_column_sum, inputs=(g,), grad=False,
                        bytes=_nbytes(g)))
    return out


def _runner(fn, inputs, grad: bool) -> Callable[[], Any]:
    if not grad:
        return lambda: fn(*inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    # the same output gradient for every backend (a seeded draw), so their gradients compare
    dy = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(1), device=out.device, dtype=out.dtype)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(dy)
        return [t.grad for t in leaves]

    return step


def _compare(ours, ref, dtype) -> float:
    ours = ours if isinstance(ours, (list, tuple)) else [ours]
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    worst = 0.0
    for a, b in zip(ours, ref):
        scale = b.float().abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


def _save(results: dict[str, Any], out: str) -> str:
    """Write what has been measured so far (a run cut short keeps its rows)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "micro_kernels.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    from graphopt.fallback import fallbacks, reset_fallbacks

    torch.manual_seed(0)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_gbs": copy_bandwidth_gbs(256 * 2**20 // (8 if args.quick else 1)),
        "cases": [],
    }
    import triton

    results["triton"] = triton.__version__
    for case in cases(args.quick):
        if args.only and not any(part in case["name"] for part in args.only.split(",")):
            continue
        row: dict[str, Any] = {"case": case["name"], "bytes": case["bytes"]}
        eager = _runner(case["fn"], case["inputs"], case["grad"])
        reference = eager()
        torch._dynamo.reset()
        reset_fallbacks()
        compile_start = time.perf_counter()
        ours_fn = torch.compile(case["fn"], backend="graphopt")
        ours = _runner(ours_fn, case["inputs"], case["grad"])
        result = ours()
        torch.cuda.synchronize()
        row["graphopt_first_call_s"] = time.perf_counter() - compile_start
        row["graphopt_fallbacks"] = [f"{k.op}: {k.reason}" for k in fallbacks()]
        row["graphopt_max_rel_error"] = _compare(result, reference, case["inputs"][0].dtype)
        inductor = _runner(torch.compile(case["fn"]), case["inputs"], case["grad"])
        inductor()
        for name, fn in (("eager", eager), ("inductor", inductor), ("graphopt", ours)):
            ms = _time_ms(fn, args.warmup, args.reps)
            row[f"{name}_ms"] = ms
            row[f"{name}_gbs"] = case["bytes"] / (ms * 1e-3) / 1e9
            if not case["grad"]:
                row[f"{name}_graph_replay_ms"] = _captured_ms(fn, args.warmup, args.reps)
        row["graphopt_vs_inductor"] = row["inductor_ms"] / row["graphopt_ms"]
        row["graphopt_fraction_of_copy_bw"] = row["graphopt_gbs"] / results["copy_bandwidth_gbs"]
        results["cases"].append(row)
        _save(results, args.out)
        print(json.dumps(row), flush=True)
    results["correctness"] = _correctness_checks()
    _save(results, args.out)
    results["cuda_graphs_check"] = _cuda_graphs_check()
    return results


def _correctness_checks(dev: str = "cuda") -> list[dict[str, Any]]:
    """Generated kernels on the GPU against eager (forward and backward): what the CPU interpreter
    cannot show (register/shared-memory limits of big blocks, real fp16/bf16 rounding, int64 paths)."""
    from graphopt import events
    from graphopt.fallback import fallbacks, reset_fallbacks
    from graphopt.runtime import GuardedCall

    def mlp(x, w1, w2):
        return F.layer_norm(x + F.gelu(x @ w1) @ w2, (x.shape[-1],)).tanh()

    def ce(logits, target):
        return F.cross_entropy(logits, target)

    def col_softmax(x):
        return torch.softmax(x, dim=0)

    def mixed(x, i):
        return torch.where(i > 3, x.float().sigmoid(), (x * 2).float()) + i.float().sum(-1, keepdim=True)

    def var_mean(x):
        v, m = torch.var_mean(x, dim=-1, keepdim=True)
        return (x - m) * torch.rsqrt(v + 1e-5) + x.amax(0)

    checks = [
        ("mlp_fp32", mlp, [(64, 256), (256, 1024), (1024, 256)], torch.float32, 1e-3),
        ("mlp_bf16", mlp, [(64, 256), (256, 1024), (1024, 256)], torch.bfloat16, 5e-2),
        ("softmax_rows_8192_fp16", _softmax, [(64, 8192)], torch.float16, 1e-2),
        ("softmax_rows_50257_fp32", _softmax, [(8, 50257)], torch.float32, 1e-4),
        ("softmax_dim0_fp32", col_softmax, [(3000, 96)], torch.float32, 1e-4),
        ("layer_norm_4096_bf16", _layer_norm, [(256, 4096), (4096,), (4096,)], torch.bfloat16, 5e-2),
        ("rms_norm_fp32", lambda x, w: F.rms_norm(x, (x.shape[-1],), w), [(512, 2048), (2048,)], torch.float32, 1e-3),
        ("var_mean_fp32", var_mean, [(300, 700)], torch.float32, 1e-3),
        # GPT-2's LM head: a vocabulary of 50257 words, padded by passes/pad_matmul.py
        ("lm_head_50257_bf16", lambda x, w: x @ w.t(), [(2048, 768), (50257, 768)], torch.bfloat16, 5e-2),
    ]
    rows = []
    for name, fn, shapes, dtype, tol in checks:
        torch._dynamo.reset()
        reset_fallbacks()
        inputs = [torch.randn(s, device=dev, dtype=dtype, requires_grad=True) for s in shapes]
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]

        def fill(row: dict[str, Any]) -> None:
            with events.capture() as graphs:
                out = torch.compile(fn, backend="graphopt")(*inputs)
                out.float().square().mean().backward()
            ref = fn(*ref_inputs)
            ref.float().square().mean().backward()
            pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(inputs, ref_inputs)]
            row["max_rel_error"] = max(_compare(a, b, dtype) for a, b in pairs)
            accurate = row["max_rel_error"] <= tol
            if dtype != torch.float32:  # low precision: at least as close to a float64 oracle as eager
                exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
                exact = fn(*exact_inputs)
                exact.float().square().mean().backward()
                truth = [exact] + [t.grad for t in exact_inputs]
                ours_err = max(_compare(a, b, None) for a, b in zip([out] + [t.grad for t in inputs], truth))
                eager_err = max(_compare(a, b, None) for a, b in zip([ref] + [t.grad for t in ref_inputs], truth))
                row["error_vs_float64"] = {"graphopt": ours_err, "eager": eager_err}
                accurate = accurate or ours_err <= 1.5 * eager_err + 1e-3
            calls = [n.target for g in graphs for n in g.output_gm.graph.nodes if isinstance(n.target, GuardedCall)]
            row["kernels"] = len(calls)
            row["failed"] = [f"{c.__name__}: {c.failed_reason}" for c in calls if c.failed_reason]
            row["fallbacks"] = [f"{k.op}: {k.reason}" for k in fallbacks()]
            row["ok"] = accurate and not row["failed"] and row["kernels"] > 0

        row = _checked(name, fill)
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch._dynamo.reset()
    logits = torch.randn(512, 32000, device=dev, requires_grad=True)
    target = torch.randint(0, 32000, (512,), device=dev)
    out = torch.compile(ce, backend="graphopt")(logits, target)
    out.backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = ce(ref_logits, target)
    ref.backward()
    rows.append({"check": "cross_entropy_32000", "max_rel_error": max(_compare(out, ref, None), _compare(logits.grad, ref_logits.grad, None))})
    torch._dynamo.reset()
    x, i = torch.randn(300, 50, device=dev, dtype=torch.float16), torch.randint(0, 8, (300, 50), device=dev)
    got = torch.compile(mixed, backend="graphopt", dynamic=True)(x, i)
    rows.append({"check": "mixed_int_fp16_dynamic", "max_rel_error": _compare(got, mixed(x, i), None)})
    print(json.dumps(rows[-2:]), flush=True)
    rows.append(_exact_division_check(dev))
    rows.append(_batch_casts_check(dev))
    rows.append(_batch_norm_training_check(dev))
    print(json.dumps(rows[-3:]), flush=True)
    return rows


def _checked(name: str, fill: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A check's row: what `fill` wrote into it, with its verdict `ok`; a check that crashes is a
    finding (its error, ok False), not the end of the run."""
    row: dict[str, Any] = {"check": name}
    try:
        fill(row)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        row["ok"] = False
    return row


def _exact_division_check(dev: str) -> dict[str, Any]:
    """Rounding divisions and integer powers, which eager computes exactly: the same values, bit for
    bit (integer floor/trunc division past 2**24, Python's float floor division, int64 powers)."""

    def fn(i, j, x, y):
        return (
            i // 7, torch.div(i, j, rounding_mode="trunc"), torch.div(-i, j, rounding_mode="floor"),
            (i % 3001 + 0).pow(5), x // 0.1, torch.div(x, y, rounding_mode="floor"), torch.div(x, y, rounding_mode="trunc"),
        )

    torch._dynamo.reset()
    i = torch.randint(-(2**50), 2**50, (4096,), device=dev)
    j = torch.randint(1, 1000, (4096,), device=dev) * torch.where(torch.rand(4096, device=dev) < 0.5, -1, 1)
    x, y = torch.randn(4096, device=dev) * 100, torch.randn(4096, device=dev)

    def fill(row: dict[str, Any]) -> None:
        got, want = torch.compile(fn, backend="graphopt")(i, j, x, y), fn(i, j, x, y)
        row["mismatches"] = [k for k, (a, b) in enumerate(zip(got, want)) if not torch.equal(a, b)]
        row["ok"] = not row["mismatches"]

    return _checked("exact_division_and_integer_pow", fill)


def _batch_casts_check(dev: str) -> dict[str, Any]:
    """Option batch_casts on an autocast training step: the same bits as without it, casts batched,
    and fewer GPU launches per step (so `_foreach_copy_` took its multi-tensor path)."""
    from graphopt import events
    from graphopt.passes.batch_casts import BatchedCast

    def step(options: dict[str, Any]) -> tuple[list[torch.Tensor], int, int]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = lambda: [torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)]  # noqa: E731
        model = torch.nn.Sequential(*(layer for _ in range(4) for layer in block())).to(dev)
        compiled = torch.compile(model, backend="graphopt", options=options)
        x = torch.randn(4096, 512, device=dev)  # activations outweigh the parameters, as in a real step

        def run() -> None:
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
                out = compiled(x)
            out.float().square().mean().backward()

        with events.capture() as graphs:
            run()
        activity = torch.profiler.ProfilerActivity.CUDA if dev == "cuda" else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            run()
        launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        batches = sum(isinstance(n.target, BatchedCast) for g in graphs for n in g.output_gm.graph.nodes)
        return [p.grad.clone() for p in model.parameters()], launches, batches

    def fill(row: dict[str, Any]) -> None:
        grads_off, launches_off, _ = step({"batch_casts": False})
        grads_on, launches_on, batches = step({"batch_casts": True})
        row.update(launches_off=launches_off, launches_on=launches_on, batches=batches)
        row["bit_equal"] = all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
        row["ok"] = row["bit_equal"] and batches > 0 and launches_on < launches_off

    return _checked("batch_casts_autocast_step", fill)


def _batch_norm_training_check(dev: str) -> dict[str, Any]:
    """Options fuse_batch_norm and batch_write_backs on a float32 conv/batch-norm/ReLU training step
    (channels-last on CUDA): gradients and running statistics as eager's; the statistics' write-backs
    batched and no cuDNN batch norm left in the graphs."""
    from graphopt import events

    def step(compile_it: bool) -> tuple[list[torch.Tensor], list[Any]]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = lambda cin, cout: [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]  # noqa: E731
        model = torch.nn.Sequential(*block(3, 64), *block(64, 128), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).to(dev)
        options = {"fuse_batch_norm": True, "batch_write_backs": True}
        run = torch.compile(model, backend="graphopt", options=options) if compile_it else model
        with events.capture() as graphs:
            for _ in range(2):  # the running statistics of two steps
                model.zero_grad()
                run(torch.randn(32, 3, 56, 56, device=dev)).square().mean().backward()
        return [p.grad for p in model.parameters()] + list(model.buffers()), graphs

    def fill(row: dict[str, Any]) -> None:
        torch.manual_seed(1)
        got, graphs = step(True)
        torch.manual_seed(1)
        want, _ = step(False)
        row["max_rel_error"] = max(_compare(a.float(), b.float(), None) for a, b in zip(got, want))
        targets = [str(n.target) for g in graphs for n in g.output_gm.graph.nodes if n.op == "call_function"]
        row["foreach_copies"] = sum("_foreach_copy_" in t for t in targets)
        row["cudnn_batch_norm"] = sum("batch_norm" in t for t in targets)
        row["ok"] = row["max_rel_error"] < 1e-3 and row["foreach_copies"] > 0 and row["cudnn_batch_norm"] == 0

    return _checked("batch_norm_training", fill)


def _cuda_graphs_check() -> dict[str, Any]:
    """mode="reduce-overhead" on a small MLP: replays must match eager, forward and backward."""
    from graphopt.fallback import fallbacks, reset_fallbacks

    torch._dynamo.reset()
    reset_fallbacks()
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.LayerNorm(512)).cuda()
    compiled = torch.compile(model, backend="graphopt", mode="reduce-overhead")
    worst = 0.0
    for _ in range(4):
        x = torch.randn(64, 256, device="cuda")
        out = compiled(x)
        ref = model(x)
        worst = max(worst, (out - ref).abs().max().item())
        out.sum().backward()
    x = torch.randn(64, 256, device="cuda")
    ms_graphs = _time_ms(lambda: compiled(x), 5, 50)
    torch._dynamo.reset()
    plain = torch.compile(model, backend="graphopt")
    ms_plain = _time_ms(lambda: plain(x), 5, 50)
    return {
        "max_abs_error": worst,
        "fallbacks": [f"{k.op}: {k.reason}" for k in fallbacks()],
        "forward_ms_cuda_graphs": ms_graphs,
        "forward_ms_plain": ms_plain,
    }


def _print_correctness(rows: list[dict[str, Any]]) -> None:
    bad = [row for row in rows if row.get("ok") is False]
    print(f"correctness: {len(rows) - len(bad)} of {len(rows)} ok", *bad, sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="sizes / 8 (a smoke run)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--checks-only", action="store_true", help="only the GPU correctness checks (a minute)")
    parser.add_argument("--only", default="", help="comma-separated name parts: only the cases that contain one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("micro_kernels.py needs a CUDA GPU")
    warnings.simplefilter("default")
    if args.checks_only:
        _print_correctness(_correctness_checks())
        return
    results = run(args)
    path = _save(results, args.out)
    print(f"\ncopy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s on {results['device']}")
    print(f"{'case':42} {'eager':>8} {'inductor':>9} {'graphopt':>9} {'GB/s':>7} {'%copy':>6} {'vs ind':>7} {'err':>8}  replay ms (ind/go)")
    for row in results["cases"]:
        replay = ""
        if row.get("graphopt_graph_replay_ms") and row.get("inductor_graph_replay_ms"):
            replay = f"  {row['inductor_graph_replay_ms']:.3f}/{row['graphopt_graph_replay_ms']:.3f}"
        print(
            f"{row['case']:42} {row['eager_ms']:8.3f} {row['inductor_ms']:9.3f} {row['graphopt_ms']:9.3f} "
            f"{row['graphopt_gbs']:7.0f} {100 * row['graphopt_fraction_of_copy_bw']:5.0f}% "
            f"{row['graphopt_vs_inductor']:6.2f}x {row['graphopt_max_rel_error']:8.1e}{replay}"
            + ("  FALLBACK " + "; ".join(row["graphopt_fallbacks"]) if row["graphopt_fallbacks"] else "")
        )
    print("cuda graphs:", json.dumps(results["cuda_graphs_check"]))
    _print_correctness(results["correctness"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
