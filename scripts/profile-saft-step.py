#!/usr/bin/env python
"""Where a SAFT step's time goes, and the per-element costs the value-gradient choice is made from.

  .venv/bin/python scripts/profile-saft-step.py --arch ViT-B-16 --num-classes 1000 --batch-size 8
      torch.profiler tables (self CPU time by op) of one SAFT step and one floor step (the step with
      no weight gradient), then each tensor's value-gradient cost under every strategy.
  .venv/bin/python scripts/profile-saft-step.py --calibrate
      seconds per multiply-add of a matrix product, per element copied from an activation's column,
      and per gathered pair, in fp32 and bf16: the figures behind saft.sparse.value_grad.COSTS.

The step is one graph over every prompt (saft.sparse.objective.classification_loss), the mask a
one-batch |grad| mask at --density, as `saft bench step` scores it. Timings need an idle machine.
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (1600, 11000):
            gen = torch.Generator().manual_seed(0)
            gy = torch.randn(tokens, 512, generator=gen).to(dtype)
            x = torch.randn(tokens, 2048, generator=gen).to(dtype)
            mac = _best(lambda: gy.t() @ x) / (tokens * 512 * 2048)
            cols = torch.randperm(2048, generator=gen)[:300].sort().values
            select = _best(lambda: x.index_select(1, cols)) / (tokens * 300)
            r, c = torch.randint(0, 512, (2000,), generator=gen), torch.randint(0, 2048, (2000,), generator=gen)
            pair = _best(lambda: (gy.index_select(1, r).float() * x.index_select(1, c).float()).sum(0)) / (tokens * 2000)
            print(f"{str(dtype):<15} T={tokens:<6} mac {mac:.2e} s  select {select:.2e} s  pair {pair:.2e} s  "
                  f"(select/mac {select / mac:.0f}, pair/mac {pair / mac:.0f})")


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import saft.sparse.kernels as kernels
    from saft.bench.step import _InputGradHooks
    from saft.models import load_model
    from saft.sparse.mask import select_mask
    from saft.sparse.objective import ClassPrompts, classification_loss
    from saft.sparse.scores import importance_scores
    from saft.sparse.update import SparseUpdate
    from saft.sparse.value_grad import STRATEGIES, forced_strategy, value_grad

    torch.manual_seed(args.seed)
    loaded = load_model(f"{args.arch}@random", seed=args.seed)
    model = loaded.model
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.arange(args.batch_size) % args.num_classes
    prompts = ClassPrompts.build(loaded.tokenizer, [f"class {i}" for i in range(args.num_classes)])
    print(f"scoring a one-batch mask at density {args.density} ...", flush=True)
    mask = select_mask(importance_scores(model, [(images, labels)], prompts, progress=False), args.density)
    for p in model.parameters():
        p.requires_grad_(False)
    update = SparseUpdate(mask)
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def saft_step():
        with update.attached(model), torch.autocast(**amp):
            loss = classification_loss(model, images, labels, prompts)[0]
        loss.backward()

    def floor_step():
        hooks = _InputGradHooks(model)
        with torch.autocast(**amp):
            loss = classification_loss(model, images, labels, prompts)[0]
        loss.backward()
        hooks.remove()

    calls = []
    original = kernels.value_grad

    def recording(gy2, x2, layout, choice=None):
        calls.append((gy2.detach(), x2.detach(), layout, layout.choose("cpu", gy2.dtype, choice or "auto")))
        return original(gy2, x2, layout, choice)

    for name, fn in (("floor", floor_step), ("saft", saft_step)):
        with forced_strategy(args.strategy):
            fn()  # warm-up
            kernels.value_grad = recording if name == "saft" else original
            calls.clear()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            kernels.value_grad = original
        print(f"\n{name} step ({args.strategy} value gradients): {seconds:.2f} s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print("\nvalue gradients per tensor (seconds; * = the automatic choice):")
    print(f"{'tokens':>7}{'out':>6}{'in':>6}{'k':>8}{'R':>6}{'C':>6}  " + "".join(f"{s:>10}" for s in STRATEGIES))
    total = {s: 0.0 for s in STRATEGIES}
    for gy2, x2, layout, chosen in sorted(calls, key=lambda c: -c[2].k)[: args.tensors]:
        cells = ""
        for s in STRATEGIES:
            t = _best(lambda: value_grad(gy2, x2, layout, s), repeats=2)
            total[s] += t
            cells += f"{t:>9.3f}{'*' if chosen.strategy == s else ' '}"
        print(f"{gy2.shape[0]:>7}{layout.out_features:>6}{layout.in_features:>6}{layout.k:>8}"
              f"{layout.uniq_rows.numel():>6}{layout.uniq_cols.numel():>6}  {cells}")
    print("total".ljust(39) + "".join(f"{total[s]:>9.3f} " for s in STRATEGIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="measure the per-element costs only")
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--strategy", choices=("auto", "gather", "product", "dense"), default="auto",
                        help="value-gradient strategy forced in the profiled SAFT step (gather = before issue 26)")
    parser.add_argument("--rows", type=int, default=15, help="ops per profiler table")
    parser.add_argument("--tensors", type=int, default=40, help="tensors in the per-strategy table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    calibrate() if args.calibrate else profile(args)


if __name__ == "__main__":
    main()
