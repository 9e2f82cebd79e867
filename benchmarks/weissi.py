"""Benchmark: a training step with the WEISSI penalty in the loss against a plain step, in the same run.

The workload: a timm ResNet-18 (10 classes) on CIFAR-size input (3x32x32; `--image-size` for others), batch 32, SGD
momentum 0.9, CPU (or `--device cuda`). WEISSI regularizes every convolution and the classifier (`bn="include"`: 21
layers, 8 residual blocks, 11.2 M weights), found once before timing (`WeissiRegularizer`). Three kinds of step run in
the same process on the same model, interleaved in blocks (plain, WEISSI, WEISSI by autograd, plain, ...) so that
drifts in machine load hit them alike: a plain step; a WEISSI step as `WeissiTrainerMixin` takes it (the penalty's
gradient added into `.grad` after the backward, `WeissiRegularizer.add_gradient_`); and one through autograd
(`loss + regularizer()`, the functional route, and the mixin's with `norm="spectral"`). Printed: the median step time
of each, the ratios to the plain step (target <= 1.05x), and the penalty alone (norms and gradient).

    python benchmarks/weissi.py [--threads 2] [--steps 60] [--device cpu] [--norm fro] [--lambda2 1e-4]
                                [--image-size 32]
    python benchmarks/weissi.py --quick      # a tiny ResNet and few steps, to check the script end to end
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
                        help="input side (the penalty's cost does not grow with it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--norm", default="fro", choices=("fro", "spectral"))
    parser.add_argument("--lambda2", type=float, default=1e-4, help="0 skips the L1 part (one pass less)")
    parser.add_argument("--quick", action="store_true", help="tiny ResNet, 10 steps of each kind")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from timm.models.resnet import BasicBlock, ResNet

    from hf_regtools.weissi import WeissiRegularizer, weissi_param_groups

    torch.manual_seed(0)
    if args.quick:
        model = ResNet(BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
        args.steps, args.block = 10, 2
    else:
        model = ResNet(BasicBlock, layers=[2, 2, 2, 2], num_classes=10)
    model = model.to(args.device).train()
    regularizer = WeissiRegularizer(model, lambda1=1e-3, lambda2=args.lambda2, norm=args.norm, bn="include")
    optimizer = torch.optim.SGD(weissi_param_groups(model, 5e-4, regularizer=regularizer), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(args.device)

    in_place = args.norm == "fro"

    def step(kind: str) -> None:
        loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        if kind == "autograd":
            loss = loss + regularizer()
        loss.backward()
        if kind == "in place":
            regularizer.add_gradient_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    kinds = ("plain", "in place", "autograd") if in_place else ("plain", "autograd")
    for kind in kinds:
        step(kind)
    times = {kind: [] for kind in kinds}
    while len(times["plain"]) < args.steps:
        for kind in kinds:
            for _ in range(args.block):
                synchronize(args.device)
                start = time.perf_counter()
                step(kind)
                synchronize(args.device)
                times[kind].append(time.perf_counter() - start)
    penalty_only = []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        if in_place:
            regularizer.add_gradient_(1.0)
        else:
            regularizer().backward()
        synchronize(args.device)
        penalty_only.append(time.perf_counter() - start)
    optimizer.zero_grad(set_to_none=True)
    median = {kind: statistics.median(values) for kind, values in times.items()}
    plain, weissi = median["plain"], median["in place" if in_place else "autograd"]
    managed = sum(weight.numel() for weight in regularizer.weights)
    print(f"timm ResNet{'-18' if not args.quick else ' (tiny)'}, {len(regularizer.weights)} regularized layers "
          f"({len(regularizer.structure.blocks)} residual blocks, {managed / 1e6:.1f} M weights), norm {args.norm}, "
          f"lambda2 {args.lambda2}, batch {args.batch}, {args.image_size}x{args.image_size}, {args.device}, "
          f"{args.threads} threads, "
          f"{args.steps} steps of each kind")
    print(f"plain step      {plain * 1e3:8.2f} ms")
    print(f"WEISSI step     {weissi * 1e3:8.2f} ms   ratio {weissi / plain:.3f}x (target <= 1.05x; "
          f"{'gradient added in place, as WeissiTrainerMixin does' if in_place else 'autograd'})")
    if in_place:
        print(f"  by autograd   {median['autograd'] * 1e3:8.2f} ms   ratio {median['autograd'] / plain:.3f}x "
              "(loss + regularizer(), the functional route)")
    print(f"penalty alone   {statistics.median(penalty_only) * 1e3:8.3f} ms   "
          f"({statistics.median(penalty_only) / plain:.1%} of a plain step; norms and gradient)")
    print(json.dumps({"plain_step_s": plain, "weissi_step_s": weissi, "ratio": weissi / plain,
                      "autograd_step_s": median["autograd"],
                      "penalty_s": statistics.median(penalty_only), "layers": len(regularizer.weights),
                      "norm": args.norm, "lambda2": args.lambda2, "image_size": args.image_size}))


if __name__ == "__main__":
    main()
