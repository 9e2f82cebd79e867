"""Benchmark: a training step with label noise against a plain step, in the same run; the sharpness probe's cost.

The workload: a timm ResNet-18 (10 classes) on CIFAR-size input (3x32x32; `--image-size` for others), batch 32, SGD
momentum 0.9, CPU (or `--device cuda`). Three kinds of step run in the same process on the same model, interleaved in
blocks (plain, flip, soft_mse, plain, ...) so that drifts in machine load hit them alike: a plain step
(cross-entropy); a step whose loss is `label_noise_loss("flip", p=0.2)` as the Trainer calls it (the step's noise
drawn for the rows of the global batch, then cross-entropy); and one with `"soft_mse"` (Gaussian noise on one-hot
targets, square loss). Printed: the median step time of each and its ratio to the plain step (target <= 1.02x): the
median over rounds of a block's median to the plain block's of the same round; and, robust to a loaded machine, the
extra time of the loss alone (noise drawn, loss forward and backward on fixed logits) against cross-entropy's, as a
share of a plain step.

Then the sharpness probe on the same model and batch (BatchNorm on batch statistics): the seconds of one
Hessian-vector product (`torch.func` jvp of grad, and vjp of grad) next to one gradient computation (forward and
backward), and the cost of one `hessian_trace` call (`--probes` products) and one `hessian_top_eigenvalue` call (at
most `--iterations` products), in products and in seconds.

    python benchmarks/label_noise.py [--threads 2] [--steps 60] [--device cpu] [--image-size 32] [--probes 8]
    python benchmarks/label_noise.py --quick      # a tiny ResNet and few steps, to check the script end to end
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    values = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--block", type=int, default=5, help="steps per block of one kind")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes of the timed hessian_trace call")
    parser.add_argument("--iterations", type=int, default=10, help="power iterations of the timed eigenvalue call")
    parser.add_argument("--quick", action="store_true", help="tiny ResNet, 10 steps of each kind")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from timm.models.resnet import BasicBlock, ResNet

    from hf_regtools.diagnostics import HessianOperator, hessian_top_eigenvalue, hessian_trace, probe_mode
    from hf_regtools.label_noise import label_noise_loss

    torch.manual_seed(0)
    if args.quick:
        model = ResNet(BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=10)
        args.steps, args.block, args.probes, args.iterations = 10, 2, 2, 2
    else:
        model = ResNet(BasicBlock, layers=[2, 2, 2, 2], num_classes=10)
    model = model.to(args.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(args.device)

    trainer_args = SimpleNamespace(seed=0, train_batch_size=args.batch, world_size=1, process_index=0,
                                   gradient_accumulation_steps=1)
    losses = {"flip": label_noise_loss("flip", p=0.2, num_classes=10),
              "soft_mse": label_noise_loss("soft_mse", sigma=0.5, num_classes=10, noise="gaussian")}
    for loss in losses.values():
        loss.on_train_begin(trainer_args, SimpleNamespace(global_step=0), None)
    counter = {"step": 0}

    def step(kind: str) -> None:
        logits = model(pixels)
        if kind == "plain":
            loss = torch.nn.functional.cross_entropy(logits, labels)
        else:
            losses[kind].on_step_begin(trainer_args, SimpleNamespace(global_step=counter["step"]), None)
            loss = losses[kind]({"logits": logits}, labels, num_items_in_batch=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1

    kinds = ("plain", "flip", "soft_mse")
    for kind in kinds:
        step(kind)
    times = {kind: [] for kind in kinds}
    rounds = {kind: [] for kind in kinds}  # the ratio of each block to the adjacent plain block
    while len(times["plain"]) < args.steps:
        block_means = {}
        for kind in kinds:
            block = []
            for _ in range(args.block):
                synchronize(args.device)
                start = time.perf_counter()
                step(kind)
                synchronize(args.device)
                block.append(time.perf_counter() - start)
            times[kind] += block
            block_means[kind] = statistics.median(block)
        for kind in kinds:
            rounds[kind].append(block_means[kind] / block_means["plain"])
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = {kind: statistics.median(values) for kind, values in rounds.items()}
    plain = median["plain"]

    logits = model(pixels).detach().requires_grad_(True)

    def loss_only(kind: str) -> None:
        if kind == "plain":
            loss = torch.nn.functional.cross_entropy(logits, labels)
        else:
            losses[kind].on_step_begin(trainer_args, SimpleNamespace(global_step=counter["step"]), None)
            loss = losses[kind]({"logits": logits}, labels, num_items_in_batch=None)
        loss.backward()
        counter["step"] += 1

    loss_s = {kind: timed(lambda: loss_only(kind), args.device, 200) for kind in kinds}
    extra = {kind: loss_s[kind] - loss_s["plain"] for kind in ("flip", "soft_mse")}

    batch = {"pixel_values": pixels, "labels": labels}

    def probe_loss(network, data):
        return torch.nn.functional.cross_entropy(network(data["pixel_values"]), data["labels"])

    parameters = [p for p in model.parameters() if p.requires_grad]
    repeats = 3 if args.quick else 5
    with probe_mode(model):
        gradient_s = timed(lambda: torch.autograd.grad(probe_loss(model, batch), parameters), args.device, repeats)
        hvp_s = {}
        for method in ("forward", "reverse"):
            operator = HessianOperator(model, probe_loss, batch, method=method)
            vector = operator.random_vector(torch.Generator().manual_seed(0))
            operator @ vector  # warm-up
            hvp_s[method] = timed(lambda: operator @ vector, args.device, repeats)
    trace_s = timed(lambda: hessian_trace(model, probe_loss, batch, args.probes), args.device, 1)
    eigen_s = timed(lambda: hessian_top_eigenvalue(model, probe_loss, batch, args.iterations, tol=0.0), args.device, 1)

    weights = sum(p.numel() for p in parameters)
    print(f"timm ResNet{'-18' if not args.quick else ' (tiny)'} ({weights / 1e6:.1f} M weights), batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, {args.device}, {args.threads} threads, "
          f"{args.steps} steps of each kind")
    print(f"plain step          {plain * 1e3:8.2f} ms")
    for kind in ("flip", "soft_mse"):
        print(f"label noise {kind:8s}{median[kind] * 1e3:8.2f} ms   ratio {ratio[kind]:.3f}x (target <= 1.02x; median "
              f"of the blocks' ratios to the adjacent plain block; of the medians {median[kind] / plain:.3f}x)")
    for kind in ("flip", "soft_mse"):
        print(f"  loss alone {kind:8s}{loss_s[kind] * 1e3:8.3f} ms against cross-entropy's {loss_s['plain'] * 1e3:.3f} ms "
              f"(forward and backward on fixed logits): {extra[kind] * 1e3:+.3f} ms a step, "
              f"{extra[kind] / plain:+.2%} of a plain step")
    print(f"gradient (fwd+bwd)  {gradient_s * 1e3:8.2f} ms")
    for method, seconds in hvp_s.items():
        print(f"HVP ({method:7s})     {seconds * 1e3:8.2f} ms   {seconds / gradient_s:.2f} gradients")
    print(f"hessian_trace       {args.probes} HVPs, {trace_s:.3f} s ({trace_s / gradient_s:.1f} gradients)")
    print(f"hessian_top_eig.    {args.iterations} HVPs, {eigen_s:.3f} s ({eigen_s / gradient_s:.1f} gradients)")
    print(json.dumps({"plain_step_s": plain, "flip_step_s": median["flip"], "soft_mse_step_s": median["soft_mse"],
                      "flip_ratio": ratio["flip"], "soft_mse_ratio": ratio["soft_mse"],
                      "plain_loss_s": loss_s["plain"], "flip_loss_s": loss_s["flip"],
                      "soft_mse_loss_s": loss_s["soft_mse"], "gradient_s": gradient_s, "hvp_forward_s": hvp_s["forward"], "hvp_reverse_s": hvp_s["reverse"],
                      "trace_hvps": args.probes, "trace_s": trace_s, "eigenvalue_hvps": args.iterations,
                      "eigenvalue_s": eigen_s, "device": args.device, "image_size": args.image_size}))


if __name__ == "__main__":
    main()
