"""Benchmark: cost of scheduling dropout / drop path per optimizer step, on a timm ViT-S.

Prints, next to baselines measured in the same run:
- the cost of one rate update with `DropRateController.set` (sites found once, floats written) vs the official
  `update_dropout` / `update_drop_path` approach (walk every module at every step);
- the time of a full training step (forward, backward, AdamW) with the update vs without, as a ratio.

Targets (issue 3): an update at most 50 microseconds, step time at most 1.02x.

    python benchmarks/dropout_schedules.py [--batch 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from hf_regtools.dropout_schedules import DropRateController
from hf_regtools.schedules import drop_schedule


def official_update(model: torch.nn.Module, dropout: float, drop_path: float) -> None:
    """The official `update_dropout` + `update_drop_path`: walk all modules, recompute the depth rule."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    rates = [x.item() for x in torch.linspace(0, drop_path, len(model.blocks))]
    for block, rate in zip(model.blocks, rates):
        for name in ("drop_path1", "drop_path2"):
            getattr(block, name).drop_prob = rate


def per_call_us(fn, repeats: int = 2000) -> float:
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = timm.create_model("vit_small_patch16_224", drop_rate=0.1, drop_path_rate=0.1, num_classes=10)
    dropout = DropRateController(model, target="dropout")
    drop_path = DropRateController(model, target="drop_path")
    schedule = lambda step: drop_schedule(step, p=0.1, cutoff_step=10**6, schedule="linear")  # changes every step  # noqa: E731

    ours = per_call_us(lambda i: (dropout.set(schedule(i)), drop_path.set(schedule(i))))
    official = per_call_us(lambda i: official_update(model, schedule(i), schedule(i)))

    x, y = torch.randn(args.batch, 3, 224, 224), torch.randint(0, 10, (args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i, update):
        if update:
            dropout.set(schedule(i))
            drop_path.set(schedule(i))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = {False: [], True: []}
    for i in range(args.steps + 2):
        for update in (False, True):
            start = time.perf_counter()
            step(i, update)
            if i >= 2:
                times[update].append(time.perf_counter() - start)
    plain, scheduled = statistics.median(times[False]), statistics.median(times[True])
    print(f"timm vit_small_patch16_224, {len(dropout.sites)} dropout sites, {len(drop_path.sites)} drop-path blocks")
    print(f"rate update (dropout + drop path): {ours:.1f} us  vs walking all modules: {official:.1f} us  "
          f"(ratio {ours / official:.2f}; target <= 50 us)")
    print(f"training step, batch {args.batch}: {scheduled * 1e3:.1f} ms with updates vs {plain * 1e3:.1f} ms without "
          f"(ratio {scheduled / plain:.3f}; target <= 1.02)")


if __name__ == "__main__":
    main()
