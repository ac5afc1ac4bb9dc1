"""Train a tiny GPT-2 through graphopt and through eager PyTorch, side by side.

    python examples/train_gpt2.py [--steps 5] [--device cpu|cuda]

Random weights and random tokens (nothing is downloaded). Both copies start from
the same weights and see the same batches, so their losses must agree step by step.
On the CPU, graphopt's generated Triton kernels run in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import transformers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu":  # Triton compiles for GPUs only; its interpreter runs the kernels on the CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout would draw different random numbers
    )
    eager_model = transformers.GPT2LMHeadModel(config).to(args.device)
    graphopt_model = copy.deepcopy(eager_model)
    compiled = torch.compile(graphopt_model, backend="graphopt")  # no `import graphopt` needed

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager_model, graphopt_model)]
    print(f"{'step':>4}  {'eager loss':>12}  {'graphopt loss':>13}  {'|diff|':>9}")
    worst = 0.0
    for step in range(args.steps):
        tokens = torch.randint(0, config.vocab_size, (4, 32), device=args.device)
        losses = []
        for run, opt in zip((eager_model, compiled), optimizers):
            opt.zero_grad(set_to_none=True)
            loss = run(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diff = abs(losses[0] - losses[1])
        worst = max(worst, diff)
        print(f"{step:>4}  {losses[0]:>12.6f}  {losses[1]:>13.6f}  {diff:>9.2e}")
    tolerance = 1e-3
    print(f"max |eager - graphopt| = {worst:.2e} ({'match' if worst <= tolerance else 'MISMATCH'}, tolerance {tolerance})")
    if worst > tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
