"""Host time per kernel launch: graphopt vs inductor on a model too small for the GPU to matter.

    python -m benchmarks.launch_overhead --layers 64 --calls 200 --out DIR

The model is a chain of `layers` blocks, each one matmul (an extern call) and one fused
pointwise kernel, on an 8x64 activation: every kernel takes a few microseconds on the GPU,
so a call's wall time is the host's cost of issuing it. Printed per backend: microseconds
per call and per block (one extern + one generated kernel). GPU-bound models are not
affected by this figure; host-bound ones (small batches, inference, many small kernels)
are dominated by it. A diagnostic next to `benchmarks.run`, not a claim.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from benchmarks import environment


class _Chain(torch.nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.weights:
            x = torch.nn.functional.gelu(x @ w) * 0.5 + x
        return x


def _us_per_call(fn, x: torch.Tensor, calls: int, repeats: int) -> float:
    """Median over `repeats` of the wall time of `calls` back-to-back calls, per call."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="eager,inductor,graphopt")
    parser.add_argument("--out", help="folder to write launch_overhead.json into (with the settings and versions)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = _Chain(args.layers, args.width).cuda().eval()
    x = torch.randn(8, args.width, device="cuda")
    rows = []
    with torch.no_grad():
        expected = model(x)
        for backend in args.backends.split(","):
            torch._dynamo.reset()
            fn = model if backend == "eager" else torch.compile(model, backend=backend)
            torch.testing.assert_close(fn(x), expected, rtol=1e-4, atol=1e-4)
            us = _us_per_call(fn, x, args.calls, args.repeats)
            rows.append({"backend": backend, "us_per_call": us, "us_per_block": us / args.layers})
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": vars(args),
            "versions": environment.versions(),
            "device_name": environment.device_name(x.device),
            "rows": rows,
        }
        (out / "launch_overhead.json").write_text(json.dumps(record, indent=1))
    print("| backend | us/call | us/block (mm + pointwise) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['us_per_call']:.0f} | {r['us_per_block']:.1f} |")


if __name__ == "__main__":
    main()
