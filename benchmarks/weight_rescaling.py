"""Benchmark: a training step with weight rescaling after it against a plain step, in the same run.

The workload: a timm ResNet-18 (10 classes) on CIFAR-size input (3x32x32, or `--image-size`), batch 32, SGD momentum
0.9 without weight decay on the managed weights, CPU (or `--device cuda`). Both kinds of step run in the same process
on the same model, interleaved in blocks (plain, WRS, plain, WRS, ...) so that drifts in machine load hit both alike;
the WRS step is the plain step followed by what `WeightRescalingCallback.on_optimizer_step` does (`rescale_weights_`
on the pairs found once, before timing). Printed: the median step time of each, their ratio (target <= 1.05x), and the
rescale alone.

    python benchmarks/weight_rescaling.py [--threads 2] [--steps 60] [--image-size 32] [--device cpu]
    python benchmarks/weight_rescaling.py --quick      # a tiny ResNet and few steps, to check the script end to end
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
    parser.add_argument("--image-size", type=int, default=32,
                        help="input side (the rescale's cost does not grow with it; 224 is the model's native size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny ResNet, 10 steps of each kind")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from timm.models.resnet import BasicBlock, ResNet

    from hf_regtools.weight_rescaling import find_scale_invariant_pairs, rescale_weights_, wrs_param_groups

    torch.manual_seed(0)
    if args.quick:
        model = ResNet(BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
        args.steps, args.block = 10, 2
    else:
        model = ResNet(BasicBlock, layers=[2, 2, 2, 2], num_classes=10)
    model = model.to(args.device).train()
    pairs = find_scale_invariant_pairs(model)
    optimizer = torch.optim.SGD(wrs_param_groups(model, 5e-4, pairs=pairs), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(args.device)

    def step(rescale: bool) -> None:
        loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        loss.backward()
        optimizer.step()
        if rescale:
            rescale_weights_(pairs)
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step(True)
    times = {False: [], True: []}
    while len(times[True]) < args.steps:
        for rescale in (False, True):
            for _ in range(args.block):
                synchronize(args.device)
                start = time.perf_counter()
                step(rescale)
                synchronize(args.device)
                times[rescale].append(time.perf_counter() - start)
    rescale_only = []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        rescale_weights_(pairs)
        synchronize(args.device)
        rescale_only.append(time.perf_counter() - start)
    plain, wrs = statistics.median(times[False]), statistics.median(times[True])
    print(f"timm ResNet{'-18' if not args.quick else ' (tiny)'}, {len(pairs)} managed layers, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, {args.device}, {args.threads} threads, {args.steps} steps of each kind")
    print(f"plain step      {plain * 1e3:8.2f} ms")
    print(f"step + rescale  {wrs * 1e3:8.2f} ms   ratio {wrs / plain:.3f}x (target <= 1.05x)")
    print(f"rescale alone   {statistics.median(rescale_only) * 1e3:8.3f} ms   "
          f"({statistics.median(rescale_only) / plain:.1%} of a plain step)")
    print(json.dumps({"plain_step_s": plain, "wrs_step_s": wrs, "ratio": wrs / plain,
                      "rescale_s": statistics.median(rescale_only), "managed_layers": len(pairs)}))


if __name__ == "__main__":
    main()
