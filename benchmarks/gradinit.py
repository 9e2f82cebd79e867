"""Benchmark: seconds per GradInit iteration as a ratio to a plain SGD step on the same batch, optionally beside the
official code.

The workload: a CIFAR ResNet-20 with BatchNorm (3 stages of 3 basic blocks, 16/32/64 channels, 0.27 M parameters),
random 32x32 images, 10 classes, S = two half-batches of `--batch / 2` (the official loader), CPU. Rows:

- `SGD step`: forward, backward and `torch.optim.SGD.step` on a batch of `--batch` images (S; the baseline, 1.0x),
  and on the 1.5 x `--batch` images an objective iteration reads (B0, B1, B2): the issue's figures for the official
  code (3.2x and 1.65x) do not say which, so both ratios are printed;
- `constraint`: GradInit iterations that all take the gradient-norm branch (gamma 1e-9): forward and backward with
  `create_graph`, then the double backward of ||g|| (target <= 3.0x);
- `objective`: iterations that all take the objective branch: forward/backward on S, simulated step, forward/backward
  on S~ (target <= 1.5x). `gamma=1e9` keeps the graph of g as any finite gamma must (the branch is only known
  after g); `gamma=inf` (the official CIFAR default) needs no graph;
- `official` (with `--official PATH`, a checkout of zhuchen03/gradinit): its `gradinit_utils.gradinit` on the same
  model, batches and threads, imported from PATH at run time (`get_batch` replaced by one without `.cuda()`; it
  writes its `chks/*_init.pth` into a temporary folder). Nothing of it is copied here.

Each figure is the median over `--repeats` timed runs of `--iterations` iterations (after a warm-up run).

    python benchmarks/gradinit.py [--official /tmp/gradinit] [--threads 2]
    python benchmarks/gradinit.py --quick      # tiny sizes, to check the script end to end
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, blocks: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, inputs = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(blocks):
                layers.append(BasicBlock(inputs, outputs, stride if index == 0 else 1))
                inputs = outputs
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return ResNet20()


def half_batches(batch: int, count: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch // 2, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (batch // 2,), generator=generator)) for _ in range(count)]


def median_time(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sgd_step_seconds(halves, iterations: int, repeats: int, count: int = 2) -> float:
    """A plain SGD step on `count` half-batches (2: S; 3: the B0, B1, B2 an objective iteration reads)."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    inputs = torch.cat([half[0] for half in halves[:count]])
    labels = torch.cat([half[1] for half in halves[:count]])

    def run():
        for _ in range(iterations):
            loss = nn.functional.cross_entropy(net(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return median_time(run, repeats) / iterations


def ours_seconds(halves, iterations: int, repeats: int, **settings) -> float:
    from hf_regtools.gradinit import gradinit_

    branch = "constraint" if settings["gamma"] < 1 else "objective"

    def run():
        report = gradinit_(model(), halves, iterations=iterations, lr=1e-3, **settings)
        assert getattr(report, f"{branch}_steps") == iterations, report

    return median_time(run, repeats) / iterations


def official_seconds(path: Path, halves, iterations: int, repeats: int, gamma: float) -> float:
    sys.path.insert(0, str(path))
    import gradinit_utils

    def get_batch(data_iter, data_loader):
        try:
            inputs, targets = next(data_iter)
        except StopIteration:
            data_iter = iter(data_loader)
            inputs, targets = next(data_iter)
        return data_iter, inputs, targets

    gradinit_utils.get_batch = get_batch
    args = types.SimpleNamespace(gradinit_resume="", gradinit_min_scale=0.01, gradinit_lr=1e-3, gradinit_grad_clip=1.0,
                                 gradinit_eta=0.1, gradinit_alg="sgd", gradinit_normalize_grad=True,
                                 gradinit_gamma=gamma, batch_no_overlap=False, gradinit_iters=iterations,
                                 expname="benchmark")

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            gradinit_utils.gradinit(model(), halves, args)

    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            return median_time(run, repeats) / iterations
        finally:
            os.chdir(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    parser.add_argument("--official", type=Path, help="a checkout of zhuchen03/gradinit to time side by side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batch", type=int, default=128, help="images in S (two half-batches)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.iterations, args.repeats = 16, 2, 1
    torch.set_num_threads(args.threads)
    halves = half_batches(args.batch)
    print(f"ResNet-20 (BN), batch {args.batch} (2 x {args.batch // 2}), {args.threads} threads, median of "
          f"{args.repeats} x {args.iterations} iterations")
    baseline = sgd_step_seconds(halves, args.iterations, args.repeats)
    step_on_three = sgd_step_seconds(halves, args.iterations, args.repeats, count=3)
    rows = [("SGD step", f"{args.batch} images (S)", baseline, None),
            ("SGD step", f"{args.batch * 3 // 2} images (B0-B2)", step_on_three, None)]
    rows.append(("hf_regtools", "constraint (gamma 1e-9)",
                 ours_seconds(halves, args.iterations, args.repeats, gamma=1e-9), 3.0))
    rows.append(("hf_regtools", "objective (gamma 1e9)",
                 ours_seconds(halves, args.iterations, args.repeats, gamma=1e9), 1.5))
    rows.append(("hf_regtools", "objective (gamma inf)",
                 ours_seconds(halves, args.iterations, args.repeats, gamma=math.inf), 1.5))
    if args.official is not None:
        for label, gamma in (("constraint (gamma 1e-9)", 1e-9), ("objective (gamma 1e9)", 1e9),
                             ("objective (gamma inf)", math.inf)):
            rows.append(("official", label, official_seconds(args.official, halves, args.iterations, args.repeats,
                                                             gamma), None))
    print(f"{'implementation':<16}{'iterations':<26}{'s/iter':>10}{'x step on S':>13}{'x step on B0-B2':>17}"
          f"{'target':>9}")
    for implementation, label, seconds, target in rows:
        print(f"{implementation:<16}{label:<26}{seconds:>10.4f}{seconds / baseline:>13.2f}"
              f"{seconds / step_on_three:>17.2f}{'' if target is None else f'<= {target:.1f}':>9}")


if __name__ == "__main__":
    main()
