"""Benchmark: training-step time of a timm ResNet with StochNorm vs plain BatchNorm, measured in the same run.

Three copies of one model (same weights) take turns on the same batch: plain BatchNorm (baseline), our StochNorm
(`apply_stochnorm`: batch statistics computed once, the chosen per-channel mean and variance applied in one pass) and
the official two-branch formulation (two `F.batch_norm` calls, then `(1 - s) * z0 + s * z1`, re-implemented here
from the spec). Prints the median step time (forward, backward, SGD) of each and the ratios to BatchNorm.

Target (issue 8): StochNorm step time at most 1.05x BatchNorm's.

    python benchmarks/stochnorm.py [--model resnet18] [--image-size 64] [--batch 32] [--steps 20] [--threads 2]
    python benchmarks/stochnorm.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch.nn import functional as F

from hf_regtools.stochnorm import StochNorm2d, apply_stochnorm
from hf_regtools.surgery import replace_modules


class TwoBranchStochNorm2d(StochNorm2d):
    """The official formulation: both branches in full, mixed per channel."""

    def _train_forward(self, input):
        moving = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                              self.eps)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, factor,
                             self.eps)
        s = torch.bernoulli(torch.full((self.num_features,), self.p, device=input.device)).view(1, -1, 1, 1)
        return (1 - s) * moving + s * batch


def two_branch(model: torch.nn.Module) -> torch.nn.Module:
    layers = {name: TwoBranchStochNorm2d.from_batchnorm(module, p=0.5) for name, module in model.named_modules()
              if type(module) is torch.nn.BatchNorm2d}
    replace_modules(model, layers)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 timed steps at batch 8, 32x32 (checks that it runs)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.image_size = 3, 8, 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    baseline = timm.create_model(args.model, num_classes=10).to(device)
    ours = copy.deepcopy(baseline)
    layers = len(apply_stochnorm(ours, p=0.5))
    models = {"batchnorm": baseline, "stochnorm": ours, "two-branch": two_branch(copy.deepcopy(baseline))}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step(name):
        loss = F.cross_entropy(models[name](x), y)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    times = {name: [] for name in models}
    for i in range(args.steps + 2):
        for name in models:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"timm {args.model}, {layers} BatchNorm layers, batch {args.batch} at {args.image_size}x{args.image_size}, "
          f"{args.device}, {args.threads} threads, median of {args.steps} steps")
    for name in ("stochnorm", "two-branch"):
        print(f"training step: {name} {median[name] * 1e3:.1f} ms vs batchnorm {median['batchnorm'] * 1e3:.1f} ms "
              f"(ratio {median[name] / median['batchnorm']:.3f}{'; target <= 1.05' if name == 'stochnorm' else ''})")


if __name__ == "__main__":
    main()
