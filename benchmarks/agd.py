"""Benchmark: the cost of an `AGD` step against `torch.optim.SGD` on the same model, and (with `--digits`) AGD's
accuracy against Adam on scikit-learn's digits.

Timing: the median over repetitions of `optimizer.step()` alone (after a backward pass) and of a whole training step
(forward, backward, step, `zero_grad`), for SGD (lr 0.1) and Adam (torch's default implementations for the device) and
for AGD, interleaved, in the same process and threads; AGD's time is printed as a ratio to SGD's and Adam's. Models: the
official code's fully connected network (`architecture/fcn.py` of `jxbz/agd`: bias-free, ReLU times sqrt(2)) at depth
8, width 512 on 32x32x3 inputs, and a bias-free 4-layer 3x3 convolutional network (32 channels, 16x16 inputs).

Digits (`--digits`): the official FCN layout at depth 3, width 128 on the 8x8 digits (1,437 training / 360 test
images, `hf_regtools.testing.digits`), batch 64, cross-entropy, 5 seeds: AGD (gain 1 and 10) from `agd_init_`
against Adam (lr 1e-3 and 3e-3) from PyTorch's default initialization, as the paper's baselines; test accuracy after
each epoch, mean over seeds.

    python benchmarks/agd.py [--threads 2]
    python benchmarks/agd.py --quick          # tiny sizes, to check the script end to end
    python benchmarks/agd.py --digits [--epochs 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from hf_regtools.optim import AGD, agd_init_


class FCN(torch.nn.Module):
    """The official FCN layout: bias-free linear layers, ReLU scaled by sqrt(2) (the He gain)."""

    def __init__(self, in_features: int, width: int, depth: int, num_labels: int):
        super().__init__()
        sizes = [in_features, *[width] * (depth - 1), num_labels]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x)) * math.sqrt(2)
        return self.layers[-1](x)


def conv_net(channels: int, depth: int, num_labels: int = 10) -> torch.nn.Module:
    layers, previous = [], 3
    for _ in range(depth):
        layers += [torch.nn.Conv2d(previous, channels, 3, padding=1, bias=False), torch.nn.ReLU()]
        previous = channels
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(channels, num_labels, bias=False))


def time_steps(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, repeats: int) -> dict[str, float]:
    agd_init_(model)
    optimizers = {"SGD": torch.optim.SGD(model.parameters(), lr=0.1), "Adam": torch.optim.Adam(model.parameters()),
                  "AGD": AGD(model.parameters())}

    def train_step(optimizer):
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    times = {f"{name} {kind}": [] for name in optimizers for kind in ("step", "train step")}
    for _ in range(repeats + 1):
        for name, optimizer in optimizers.items():
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            start = time.perf_counter()
            optimizer.step()
            times[f"{name} step"].append(time.perf_counter() - start)
            optimizer.zero_grad()
            start = time.perf_counter()
            train_step(optimizer)
            times[f"{name} train step"].append(time.perf_counter() - start)
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def timing(args) -> None:
    width, channels, batch, repeats = (64, 8, 8, 3) if args.quick else (512, 32, 128, 10)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    torch.manual_seed(0)
    models = {f"FCN depth 8 width {width}": (FCN(3 * 32 * 32, width, 8, 10), inputs),
              f"conv net 4x{channels} channels 3x3": (conv_net(channels, 4), inputs[:, :, ::2, ::2])}
    print(f"{torch.get_num_threads()} threads, batch {batch}, median of {repeats}; ms, and AGD's time as a ratio")
    print(f"{'model':<34}{'what':<12}{'SGD':>9}{'Adam':>9}{'AGD':>9}{'AGD/SGD':>9}{'AGD/Adam':>10}")
    for label, (model, model_inputs) in models.items():
        t = time_steps(model, model_inputs, labels, repeats)
        for kind in ("step", "train step"):
            sgd, adam, agd = (t[f"{name} {kind}"] for name in ("SGD", "Adam", "AGD"))
            print(f"{label:<34}{kind:<12}{sgd * 1e3:>9.3f}{adam * 1e3:>9.3f}{agd * 1e3:>9.3f}{agd / sgd:>9.2f}"
                  f"{agd / adam:>10.2f}")


def digits(args) -> None:
    from hf_regtools.testing.digits import digits_dataset, tensors

    train_x, train_y = tensors(digits_dataset(split="train"))
    test_x, test_y = tensors(digits_dataset(split="test"))
    seeds = range(2 if args.quick else 5)
    epochs = 2 if args.quick else args.epochs

    def run(optimizer_name: str, seed: int) -> list[float]:
        torch.manual_seed(seed)
        model = FCN(64, 128, 3, 10)
        if optimizer_name.startswith("AGD"):
            agd_init_(model)
            optimizer = AGD(model.parameters(), gain=float(optimizer_name.split("gain ")[1]))
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=float(optimizer_name.split("lr ")[1]))
        generator, accuracies = torch.Generator().manual_seed(seed), []
        for _ in range(epochs):
            for batch in torch.randperm(len(train_y), generator=generator).split(64):
                torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                accuracies.append((model(test_x).argmax(-1) == test_y).float().mean().item())
        return accuracies

    print(f"digits, FCN depth 3 width 128, batch 64, {len(seeds)} seeds: mean test accuracy after each epoch "
          f"(min over seeds at the end)")
    for name in ("AGD gain 1", "AGD gain 10", "Adam lr 1e-3", "Adam lr 3e-3"):
        runs = [run(name, seed) for seed in seeds]
        means = [statistics.mean(r[epoch] for r in runs) for epoch in range(epochs)]
        print(f"{name:<14}" + " ".join(f"{m:.3f}" for m in means) + f"   (min {min(r[-1] for r in runs):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--digits", action="store_true", help="accuracy on digits against Adam instead of timing")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the digits runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits(args) if args.digits else timing(args)


if __name__ == "__main__":
    main()
