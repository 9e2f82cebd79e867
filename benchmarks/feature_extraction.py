"""Benchmark: `class_prototypes` throughput against plain batched inference of the same backbone on the same data, and
the cached re-run against the first run.

Data: scikit-learn digits (the first `--images`, 8x8 upsampled bilinearly to `--size`, three channels, ImageNet
normalisation), stored preprocessed as a `pixel_values` column of a `datasets.Dataset` with the digit as its label.
Backbone: a timm ResNet-18 layout (`--layers` blocks per stage, default one: ResNet-10) with random weights.

- baseline: a torch `DataLoader` over the same preprocessed tensors (a `TensorDataset`), the model in eval mode under
  `torch.no_grad`, `forward_head(forward_features(x), pre_logits=True)` per batch;
- `class_prototypes(model, dataset)`: the same batches through the dataset, `pooled_features` and the per-class sums;
- cached: the second call with the same `cache_dir` (loads the safetensors file).

Times are the median of `--repeats` interleaved runs in one process; the ratio printed is baseline time /
`class_prototypes` time (1.0 = as fast; the target is >= 0.9), and first run / cached run (target >= 20).

    python benchmarks/feature_extraction.py [--threads 2] [--images 512] [--size 64] [--batch-size 64]
    python benchmarks/feature_extraction.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch


def build(images: int, size: int, layers: int):
    import datasets
    import timm
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = min(images, len(digits.images))
    x = torch.tensor(digits.images[:count], dtype=torch.float32).div(16).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (x - mean) / std
    labels = torch.tensor(digits.target[:count])
    dataset = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "label": labels.numpy()})
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, layers=[layers] * 4, num_classes=10).eval()
    return model, pixels, labels, dataset


def baseline(model, pixels, labels, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, labels), batch_size=batch_size)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model.forward_head(model.forward_features(x), pre_logits=True)
    return time.perf_counter() - start


def ours(model, dataset, batch_size: int, cache_dir=None) -> float:
    from hf_regtools.data_selection.prototypes import class_prototypes

    start = time.perf_counter()
    class_prototypes(model, dataset, batch_size=batch_size, progress=False, cache_dir=cache_dir)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.repeats = 64, 32, 2
    torch.set_num_threads(args.threads)
    model, pixels, labels, dataset = build(args.images, args.size, args.layers)
    ours(model, dataset, args.batch_size)  # warm-up (allocator, Arrow reads)
    baseline(model, pixels, labels, args.batch_size)
    times = {"baseline": [], "class_prototypes": [], "first (cache write)": [], "cached": []}
    for _ in range(args.repeats):
        times["baseline"].append(baseline(model, pixels, labels, args.batch_size))
        times["class_prototypes"].append(ours(model, dataset, args.batch_size))
        folder = tempfile.mkdtemp(prefix="feature_cache_")
        try:
            times["first (cache write)"].append(ours(model, dataset, args.batch_size, cache_dir=folder))
            times["cached"].append(ours(model, dataset, args.batch_size, cache_dir=folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    count = len(dataset)
    print(f"timm ResNet-18 layout, {args.layers} block(s)/stage, {count} images {args.size}x{args.size}, batch "
          f"{args.batch_size}, {args.threads} threads, median of {args.repeats}")
    for name, seconds in median.items():
        print(f"  {name:<22} {seconds * 1e3:9.1f} ms  {count / seconds:10.1f} images/s")
    print(f"  throughput ratio (baseline / class_prototypes): {median['baseline'] / median['class_prototypes']:.3f}x"
          " (target >= 0.9)")
    print(f"  cached re-run speed-up (first / cached): {median['first (cache write)'] / median['cached']:.1f}x"
          " (target >= 20)")


if __name__ == "__main__":
    main()
