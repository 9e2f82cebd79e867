"""Benchmark: a training step with the large-initial-LR scheduler, and with the activation noise, against a plain step.

The workload: a timm ResNet-18 (10 classes) on CIFAR-size input (3x32x32), batch 32, SGD momentum 0.9, CPU (or
`--device cuda`). Three kinds of step run in the same process on the same model, interleaved in blocks (plain,
scheduler, noise, plain, ...) so that drifts in machine load hit them alike: a plain step (forward, backward, SGD step);
the same plus `LambdaLR(large_initial_lr_lambda(...)).step()` (what the Trainer does per update; target <= 1.02x); and
the scheduler step with `ActivationNoise` hooks on every BatchNorm (the official noise sites: one shared H x W map per
site and forward, drawn from a generator keyed by seed, step and call). Printed: the median step time of each, the
median over rounds of each block's median to the plain block's of the same round, and the time of the scheduler step
alone. Then the patch transform's cost per batch of 128 CIFAR-size images (per-example keyed draws).

    python benchmarks/large_lr.py [--threads 2] [--steps 60] [--device cpu]
    python benchmarks/large_lr.py --quick      # a tiny ResNet and few steps, to check the script end to end
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--block", type=int, default=5, help="steps per block of one kind")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny ResNet, 10 steps of each kind")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from timm.models.resnet import BasicBlock, ResNet

    from hf_regtools.large_lr import ActivationNoise, PatchTransform, large_initial_lr_lambda

    torch.manual_seed(0)
    if args.quick:
        model = ResNet(BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
        args.steps, args.block = 10, 2
    else:
        model = ResNet(BasicBlock, layers=[2, 2, 2, 2], num_classes=10)
    model = model.to(args.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, large_initial_lr_lambda(391, (30, 60), (0.04, 0.2)))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, 32, 32, generator=generator).to(args.device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(args.device)
    noise = ActivationNoise(model, std=0.4)
    noise.set_level(0.0)
    step_count = [0]

    def step(kind: str) -> float:
        synchronize(args.device)
        start = time.perf_counter()
        if kind == "noise":
            noise.set_step(step_count[0])
        loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if kind != "plain":
            scheduler.step()
        synchronize(args.device)
        step_count[0] += 1
        return time.perf_counter() - start

    kinds = ("plain", "scheduler", "noise")
    for kind in kinds:  # warm-up
        noise.set_level(0.4 if kind == "noise" else 0.0)
        for _ in range(2):
            step(kind)
    times = {kind: [] for kind in kinds}
    ratios = {kind: [] for kind in kinds[1:]}
    for _ in range(max(args.steps // args.block, 1)):
        medians = {}
        for kind in kinds:
            noise.set_level(0.4 if kind == "noise" else 0.0)
            block = [step(kind) for _ in range(args.block)]
            times[kind] += block
            medians[kind] = statistics.median(block)
        for kind in kinds[1:]:
            ratios[kind].append(medians[kind] / medians["plain"])
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    alone = []
    for _ in range(1000):
        start = time.perf_counter()
        scheduler.step()
        alone.append(time.perf_counter() - start)
    transform = PatchTransform()
    images, batch_labels = torch.randn(128, 3, 32, 32), torch.arange(128) % 10
    patch_times = []
    for epoch in range(5):
        start = time.perf_counter()
        transform.patch(images, batch_labels, range(128), epoch=epoch)
        patch_times.append(time.perf_counter() - start)
    result = {
        "step_s": {kind: statistics.median(values) for kind, values in times.items()},
        "ratio_to_plain": {kind: statistics.median(values) for kind, values in ratios.items()},
        "scheduler_step_alone_us": 1e6 * statistics.median(alone),
        "patch_transform_batch128_ms": 1e3 * statistics.median(patch_times),
        "threads": args.threads, "device": args.device, "batch": args.batch, "steps_per_kind": len(times["plain"]),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
