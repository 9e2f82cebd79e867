"""Benchmark: weight selection reading the teacher tensor by tensor vs loading its full state dict first.

Creates random-weight ViT-B/16 and ViT-L/16 teachers as safetensors files, then selects a ViT-Tiny student from each,
every measurement in a fresh process:

- `lazy`: `select_weights(CheckpointReader(file), student)` (what `initialize_student` / `hf-regtools select` do);
- `full` (the baseline of the target): the full teacher state dict loaded into memory first with `torch.load` of
  the same weights saved as `pytorch_model.bin` (adds about 1.1 GiB for ViT-L/16), then selection;
- `mmap`: `safetensors.torch.load_file(file)` as safetensors 0.8 does it, a zero-copy memory map whose pages
  become resident as selection reads them and are never released; shown for reference.

Printed: wall time of the selection (imports excluded), the peak memory it adds above the interpreter's own
(RSS after imports; peak from `VmHWM` in /proc/self/status, the high-water mark of this process's own
address space: `ru_maxrss` would carry over the parent's peak across `exec`), and lazy/full ratios. Target for ViT-L/16 -> ViT-Tiny: memory ratio at
most 0.3, time ratio at most 1.0.

    python benchmarks/weight_selection.py [--repeats 3] [--cache-dir benchmarks/.cache]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TEACHERS = {"ViT-B/16": "vit_base_patch16_224", "ViT-L/16": "vit_large_patch16_224"}
STUDENT = "vit_tiny_patch16_224"

CHILD = r"""
import json, sys, time
import psutil, torch, timm
from safetensors.torch import load_file
from hf_regtools.checkpoint import CheckpointReader
from hf_regtools.weight_selection import select_weights
torch.set_num_threads(1)
mode, path, student_name = sys.argv[1:4]
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
student = timm.create_model(student_name, pretrained=False)
if mode == "lazy":
    teacher = CheckpointReader(path)
elif mode == "mmap":
    teacher = load_file(path)
else:
    teacher = torch.load(path.replace(".safetensors", ".bin"), weights_only=True)
report = select_weights(teacher, student)
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "added_bytes": peak - baseline, "baseline_bytes": baseline,
                  "loaded": len(report.loaded)}))
"""


def make_teacher(architecture: str, path: Path) -> Path:
    """Write a random-weight teacher (normal(0, 0.02) everywhere) as safetensors and as a PyTorch `.bin`."""
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.device("meta"):
        skeleton = timm.create_model(architecture, pretrained=False)
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(value.shape, generator=generator) * 0.02 for key, value in skeleton.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.replace(path)
    torch.save(tensors, partial)
    partial.replace(path.with_suffix(".bin"))
    return path


def measure(mode: str, path: Path) -> dict:
    env_python = [sys.executable, "-c", CHILD, mode, str(path), STUDENT]
    proc = subprocess.run(env_python, capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(Path.home())})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache")
    args = parser.parse_args()

    rows, met = [], True
    for label, architecture in TEACHERS.items():
        path = make_teacher(architecture, args.cache_dir / f"{architecture}.safetensors")
        results = {"full": [], "mmap": [], "lazy": []}
        for _ in range(args.repeats):
            for mode in results:
                results[mode].append(measure(mode, path))
        median = {mode: {k: statistics.median(r[k] for r in runs) for k in ("seconds", "added_bytes")}
                  for mode, runs in results.items()}
        rows.append((label, path.stat().st_size, median))
        if label == "ViT-L/16":
            met = (median["lazy"]["added_bytes"] <= 0.3 * median["full"]["added_bytes"]
                   and median["lazy"]["seconds"] <= median["full"]["seconds"])
        interpreter = statistics.median(r["baseline_bytes"] for r in results["lazy"])

    print(f"weight selection -> {STUDENT}, median of {args.repeats} fresh processes, 1 thread each; "
          f"interpreter after imports: {interpreter / 2**20:.0f} MiB")
    print(f"{'teacher':<10}{'file MiB':>9}{'baseline':>9}{'base s':>8}{'lazy s':>8}{'time ratio':>11}"
          f"{'base +MiB':>10}{'lazy +MiB':>10}{'memory ratio':>13}")
    for label, size, median in rows:
        lazy = median["lazy"]
        for baseline in ("full", "mmap"):
            base = median[baseline]
            print(f"{label:<10}{size / 2**20:>9.0f}{baseline:>9}{base['seconds']:>8.3f}{lazy['seconds']:>8.3f}"
                  f"{lazy['seconds'] / base['seconds']:>11.2f}{base['added_bytes'] / 2**20:>10.0f}"
                  f"{lazy['added_bytes'] / 2**20:>10.0f}{lazy['added_bytes'] / base['added_bytes']:>13.2f}")
    print(f"target for ViT-L/16 against the full load (memory ratio <= 0.30, time ratio <= 1.00): "
          f"{'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
