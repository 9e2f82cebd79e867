"""Benchmark: a student cut from a teacher on the (loopback fake) Hub by byte ranges vs downloading the teacher first.

Two cases, each through the loopback fake Hub (`hf_regtools.testing.fake_hub`, served from a subprocess):

- ViT-Tiny (the `vit-tiny` preset) from a timm ViT-L/16 teacher (`vit_large_patch16_224`, random weights, one
  1.2 GB `model.safetensors`, written once into `--cache-dir`);
- a 0.55B Llama student (hidden 1536, 16 layers, 12 heads of 128, MLP 4096) from the random bf16 7B Llama teacher
  of `benchmarks/weight_selection_llm.py` (7 shards with an index, 13.5 GB; reused from `--llama-dir`, written
  there by that benchmark's `make_teacher` if missing). `--llama 1.1B` takes its 1.1B teacher instead.

Each measurement runs in a fresh process (imports excluded from the time) with its own empty Hugging Face cache:

- `remote`: `initialize_student(repo_id, ...)`, what `hf-regtools select ORG/NAME` does: the headers and then only
  the byte ranges of the tensors the student maps to;
- `download` (the baseline): `snapshot_download(repo_id)`, then `initialize_student(folder, ...)` on the snapshot.

Bytes are what the fake Hub sent (file content, all requests: config, headers, tensors or whole files), exact; times
are wall clock on a shared machine, so noisy. Printed: both, and remote/download ratios. The caches (13.5 GB for the
7B download) live in a temporary folder deleted after each measurement.

The fake Hub serves the teachers' files from memory maps. Its ETag is a content hash; to keep it from hashing a
2 GB shard on every request, this benchmark gives each file an id from its name, size and first MiB instead.

    python benchmarks/weight_selection_remote.py [--repeats 1] [--threads 2] [--cache-dir benchmarks/.cache]
        [--llama-dir DIR] [--llama 7B|1.1B]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from weight_selection_llm import STUDENTS as LLAMA_STUDENTS  # noqa: E402
from weight_selection_llm import make_teacher as make_llama_teacher  # noqa: E402

VIT_TEACHER = "vit_large_patch16_224"

SERVER = r"""
import hashlib, json, mmap, os, sys
from pathlib import Path
from hf_regtools.testing import fake_hub

_ids = {}
_git_oid = fake_hub._git_oid
def _file_oid(data):
    if isinstance(data, mmap.mmap):
        if id(data) not in _ids:
            _ids[id(data)] = hashlib.sha1(b"%d" % len(data) + data[:2**20]).hexdigest()
        return _ids[id(data)]
    return _git_oid(data)
fake_hub._git_oid = _file_oid

hub = fake_hub.FakeHub().start()
for repo_id, folder in json.loads(sys.argv[1]).items():
    files = {}
    for path in sorted(Path(folder).iterdir()):
        with open(path, "rb") as handle:
            files[path.name] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    hub._repos["model", repo_id] = {"commits": [sha], "files": {sha: files}, "refs": {"main": sha}, "private": False}
print(hub.url, flush=True)
for line in sys.stdin:  # "bytes": print and reset the bytes sent
    with hub._lock:
        sent, hub.bytes_sent = hub.bytes_sent, 0
    print(sent, flush=True)
hub.stop()
"""

CHILD = r"""
import json, sys, time
import torch
from huggingface_hub import snapshot_download
from hf_regtools.weight_selection import initialize_student
mode, repo_id, student = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
start = time.perf_counter()
if mode == "download":
    result = initialize_student(snapshot_download(repo_id), **student)
else:
    result = initialize_student(repo_id, **student)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "source": result.weights_source, "tensor_bytes": result.bytes_read,
                  "student_parameters": sum(p.numel() for p in result.model.parameters())}))
"""


def make_vit_teacher(folder: Path) -> Path:
    """Write a random-weight timm ViT-L/16 (safetensors + config) once."""
    if (folder / "model.safetensors").is_file():
        return folder
    import timm
    import torch

    from hf_regtools.adapters import save_model

    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    save_model(timm.create_model(VIT_TEACHER, pretrained=False), partial)
    partial.replace(folder)
    return folder


class Server:
    """The fake Hub in a subprocess, serving `{repo_id: folder}` from memory maps."""

    def __init__(self, repos: dict[str, Path]):
        repos = json.dumps({repo_id: str(folder) for repo_id, folder in repos.items()})
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, repos], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the fake Hub did not start")

    def bytes_sent(self) -> int:
        """Bytes of file content sent since the last call."""
        self.process.stdin.write("bytes\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def measure(server: Server, mode: str, repo_id: str, student: dict, threads: int) -> dict:
    cache = tempfile.mkdtemp(prefix="hf_regtools_bench_hub_")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_HOME")}
    env.update(HF_ENDPOINT=server.url, HF_HOME=cache, HF_HUB_CACHE=os.path.join(cache, "hub"), HF_HUB_DISABLE_XET="1",
               HF_TOKEN="hf_fake", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS=str(threads))
    server.bytes_sent()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, repo_id, json.dumps(student)], capture_output=True,
                              text=True, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} of {repo_id} failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    run["bytes_sent"] = server.bytes_sent()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache")
    parser.add_argument("--llama-dir", type=Path, default=os.environ.get("HF_REGTOOLS_LLAMA_TEACHER"),
                        help="folder of the Llama teacher (default: CACHE_DIR/llama-{--llama}-bf16)")
    parser.add_argument("--llama", choices=("7B", "1.1B"), default="7B")
    args = parser.parse_args()

    llama_dir = make_llama_teacher(args.llama, args.llama_dir or args.cache_dir / f"llama-{args.llama}-bf16")
    vit_dir = make_vit_teacher(args.cache_dir / "vit-large-patch16-224-timm")
    llama_student = "0.55B" if args.llama == "7B" else "0.19B"
    cases = {
        "ViT-L/16 -> ViT-Tiny": ("bench/vit-large-patch16-224", vit_dir, {"student": "vit-tiny"}),
        f"Llama {args.llama} -> {llama_student}": (f"bench/llama-{args.llama}", llama_dir, LLAMA_STUDENTS[args.llama]),
    }
    server = Server({repo_id: folder for repo_id, folder, _ in cases.values()})
    print(f"Weight selection from a teacher on the loopback fake Hub ({server.url}), median of {args.repeats} fresh "
          f"processes, {args.threads} threads; bytes: sent by the fake Hub (exact), times: shared machine (noisy)")
    print(f"{'case':<24}{'teacher GB':>11}{'remote GB':>11}{'remote s':>10}{'download GB':>13}{'download s':>12}"
          f"{'bytes ratio':>13}{'time ratio':>12}")
    try:
        for name, (repo_id, folder, student) in cases.items():
            runs = {mode: [measure(server, mode, repo_id, student, args.threads) for _ in range(args.repeats)]
                    for mode in ("remote", "download")}
            assert {r["source"] for r in runs["remote"]} == {"remote"}, runs["remote"]
            sent = {mode: statistics.median(r["bytes_sent"] for r in values) for mode, values in runs.items()}
            seconds = {mode: statistics.median(r["seconds"] for r in values) for mode, values in runs.items()}
            teacher = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            print(f"{name:<24}{teacher / 1e9:>11.3f}{sent['remote'] / 1e9:>11.3f}{seconds['remote']:>10.1f}"
                  f"{sent['download'] / 1e9:>13.3f}{seconds['download']:>12.1f}"
                  f"{sent['remote'] / sent['download']:>13.3f}{seconds['remote'] / seconds['download']:>12.2f}")
            print(json.dumps({"case": name, "teacher_bytes": teacher, **{f"{m}_runs": v for m, v in runs.items()}}))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
