"""Benchmark: Bayesian nested-dropout training step vs the same network without nested layers; sub-network extraction.

Two copies of one VGG-style BatchNorm CNN (same weights) take turns on the same batch: the plain network (baseline)
and the network converted with `convert_to_nested` (`NestedConv2d` with local reparameterisation and a sampled mask,
`LinearVDO`), whose loss adds `1e-5 * nested_kl(model)`. Prints the median step time (forward, backward, SGD) of
each and their ratio, then for each width the time of `extract_subnet` (without BatchNorm recalibration), the
sub-network's parameter count and its forward time against the full width's.

    python benchmarks/nested_dropout.py [--widths 96,192,384,384] [--image-size 32] [--batch 64] [--steps 20]
    python benchmarks/nested_dropout.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.nn import functional as F

from hf_regtools.nested_dropout import convert_to_nested, extract_subnet, nested_kl
from hf_regtools.testing.tiny_models import VGGClassifier

RHOS = (1.0, 0.75, 0.5, 0.25, 0.0)


def timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of `function()` over `repeats` calls, after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,M,128,M,256,256,M,256,256",
                        help="VGG config: channels per convolution, M for 2x2 max-pooling")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-div", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 timed steps of a small network (checks that it runs)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.widths, args.num_div, args.image_size = 3, 8, "16,M,32,32", 8, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = tuple("M" if item == "M" else int(item) for item in args.widths.split(","))
    baseline = VGGClassifier(config=config, hidden=256, num_labels=10).to(device)
    nested = convert_to_nested(copy.deepcopy(baseline), num_div=args.num_div, freeze=2, prior_pi=0.95)
    models = {"plain": baseline, "nested": nested}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) for name, model in models.items()}
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step(name):
        model = models[name]
        loss = F.cross_entropy(model(x)["logits"], y)
        if name == "nested":
            loss = loss + 1e-5 * nested_kl(model)
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
    print(f"VGG {args.widths}, num_div {args.num_div}, batch {args.batch} at {args.image_size}x{args.image_size}, "
          f"{args.device}, {args.threads} threads, median of {args.steps} steps")
    print(f"training step: nested {median['nested'] * 1e3:.1f} ms vs plain {median['plain'] * 1e3:.1f} ms "
          f"(ratio {median['nested'] / median['plain']:.3f})")

    nested.eval()
    with torch.no_grad():
        full = extract_subnet(nested, 1.0)
        full_forward = timed(lambda: full(x), max(3, args.steps // 2), device)
        print("| rho | extraction (ms) | parameters | share of full width | forward (ms) | forward ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for rho in RHOS:
            seconds = timed(lambda: extract_subnet(nested, rho), 3, device)
            subnet = extract_subnet(nested, rho)
            info = subnet.nested_subnet_info
            forward = timed(lambda: subnet(x), max(3, args.steps // 2), device)
            share = info.parameters / info.full_parameters
            print(f"| {rho:.2f} | {seconds * 1e3:.1f} | {info.parameters} | {share:.3f} | {forward * 1e3:.2f} "
                  f"| {forward / full_forward:.3f} |")


if __name__ == "__main__":
    main()
