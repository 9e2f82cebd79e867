"""Benchmark: a 0.5B Llama student cut from a 7B Llama teacher on local disk, memory and time.

Writes random bf16 Llama-architecture teachers once as sharded safetensors (with `model.safetensors.index.json`):
a 7B teacher (the Llama-2-7B shape: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000; 6.7B parameters,
12.6 GiB) and a 1.1B teacher (the TinyLlama shape: hidden 2048, 22 layers, 32 heads of 64, 4 key/value heads, MLP
5632). Each measurement runs in a fresh process with `OMP_NUM_THREADS` threads:

- `lazy` on the 7B teacher: `initialize_student(folder, ...)`, what `hf-regtools select` does: the student
  (hidden 1536, 16 layers, 12 heads of 128, MLP 4096; 0.55B parameters) built in the teacher's dtype and initialized
  tensor by tensor from the memory-mapped shards. Targets: peak memory above the interpreter's own at most 2 GiB,
  wall time under 60 s.
- `lazy` and `full` on the 1.1B teacher (student: hidden 1024, 11 layers, 16 heads of 64, 2 key/value heads, MLP
  2816): `full`, the baseline, loads the teacher with `AutoModelForCausalLM.from_pretrained(dtype=torch.bfloat16)`
  first and then selects from the module; printed as lazy/full ratios.

Memory is the peak (`VmHWM`) above the RSS after imports; time excludes imports and includes building the student.

    python benchmarks/weight_selection_llm.py [--repeats 3] [--threads 2] [--cache-dir benchmarks/.cache]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TEACHERS = {
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),
}
STUDENTS = {
    "7B": dict(hidden_size=1536, depth=16, num_heads=12, num_key_value_heads=12, mlp_dim=4096),
    "1.1B": dict(hidden_size=1024, depth=11, num_heads=16, num_key_value_heads=2, mlp_dim=2816),
}
SHARD_BYTES = 2 * 2**30

CHILD = r"""
import json, sys, time
import psutil, torch
from hf_regtools.weight_selection import initialize_student, select_weights
mode, folder, student = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
baseline = psutil.Process().memory_info().rss
start = time.perf_counter()
if mode == "full":
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    result = initialize_student(teacher, **student)
else:
    result = initialize_student(folder, **student)
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
parameters = sum(p.numel() for p in result.model.parameters())
print(json.dumps({"seconds": seconds, "added_bytes": peak - baseline, "baseline_bytes": baseline,
                  "student_parameters": parameters, "dtype": str(next(result.model.parameters()).dtype)}))
"""


def make_teacher(label: str, folder: Path) -> Path:
    """Write a random bf16 Llama teacher (normal(0, 0.02)) as safetensors shards of at most 2 GiB, once."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                         **TEACHERS[label])
    config.dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, value in skeleton.state_dict().items():
        nbytes = value.numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = tuple(value.shape)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
                   for key, shape in shard.items()}
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(shard, name))
        del tensors
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(partial)
    partial.replace(folder)
    return folder


def measure(mode: str, folder: Path, student: dict, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), json.dumps(student)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                          "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"{mode} on {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache")
    args = parser.parse_args()

    folders = {label: make_teacher(label, args.cache_dir / f"llama-{label}-bf16") for label in TEACHERS}
    runs = {("7B", "lazy"): [], ("1.1B", "full"): [], ("1.1B", "lazy"): []}
    for _ in range(args.repeats):
        for label, mode in runs:
            runs[(label, mode)].append(measure(mode, folders[label], STUDENTS[label], args.threads))
    median = {key: {k: statistics.median(r[k] for r in values) for k in ("seconds", "added_bytes")}
              for key, values in runs.items()}
    interpreter = statistics.median(r["baseline_bytes"] for r in runs[("7B", "lazy")])
    print(f"Llama weight selection, median of {args.repeats} fresh processes, {args.threads} threads; interpreter "
          f"after imports: {interpreter / 2**20:.0f} MiB")
    print(f"{'teacher':<8}{'student':>9}{'mode':>6}{'seconds':>9}{'+GiB':>7}")
    for (label, mode), values in median.items():
        parameters = runs[(label, mode)][0]["student_parameters"]
        print(f"{label:<8}{parameters / 1e9:>8.2f}B{mode:>6}{values['seconds']:>9.1f}"
              f"{values['added_bytes'] / 2**30:>7.2f}")
    lazy, full = median[("1.1B", "lazy")], median[("1.1B", "full")]
    print(f"1.1B teacher, lazy/full: time ratio {lazy['seconds'] / full['seconds']:.2f}, memory ratio "
          f"{lazy['added_bytes'] / full['added_bytes']:.2f}")
    big = median[("7B", "lazy")]
    met = big["added_bytes"] <= 2 * 2**30 and big["seconds"] < 60
    print(f"target for 7B -> 0.5B (at most 2 GiB above the interpreter, under 60 s): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
