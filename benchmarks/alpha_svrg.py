"""Benchmark: alpha-SVRG epoch time and memory, as ratios to plain AdamW on the same model and data.

Models (issue 3): a tiny ViT (image 32, patch 4, embed 96, depth 4, 3 heads) and a 4-layer MLP, batch 128, synthetic
data of 2048 samples (16 steps per epoch), snapshot every epoch, `transformers.Trainer` with `max_grad_norm=0`.
Each configuration runs in a fresh process (2 threads); time is the median epoch of 3 (the first excluded),
memory the peak RSS (`VmHWM`) above the process's RSS before training, also in units of the model's size.
Targets: snapshot mode at most 2.5x the AdamW epoch time, cache mode at most 1.7x (the reference implementation
measures 2.7x and 1.8x for this ViT on a 2-core CPU); peak memory with a snapshot model at most the base + 3
model-sized tensors.

    python benchmarks/alpha_svrg.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, time
import psutil, torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification
from hf_regtools.alpha_svrg import AlphaSVRGTrainerMixin
from hf_regtools.trainer import RegtoolsTrainerMixin

model_name, mode = sys.argv[1:3]

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 512), torch.nn.GELU(),
                                       torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                       torch.nn.GELU(), torch.nn.Linear(512, 10))
    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

torch.manual_seed(0)
model = MLP() if model_name == "mlp" else ViTForImageClassification(ViTConfig(
    image_size=32, patch_size=4, hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
    num_labels=10))
g = torch.Generator().manual_seed(0)
data = Dataset.from_dict({"pixel_values": torch.randn(2048, 3, 32, 32, generator=g).numpy(),
                          "labels": torch.randint(0, 10, (2048,), generator=g).numpy()}).with_format("torch")

class EpochTimer(TrainerCallback):
    def __init__(self): self.times = []
    def on_epoch_begin(self, *a, **k): self.start = time.perf_counter()
    def on_epoch_end(self, *a, **k): self.times.append(time.perf_counter() - self.start)

class Plain(RegtoolsTrainerMixin, Trainer): pass
class SVRG(AlphaSVRGTrainerMixin, Trainer): pass
timer = EpochTimer()
args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=4, per_device_train_batch_size=128, learning_rate=1e-3,
                         max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                         disable_tqdm=True, dataloader_drop_last=True)
kwargs = {"alpha_svrg": {"alpha0": 0.75, "kind": "constant", "mode": mode}} if mode != "plain" else {}
trainer = (Plain if mode == "plain" else SVRG)(model=model, args=args, train_dataset=data, callbacks=[timer], **kwargs)
before = psutil.Process().memory_info().rss
trainer.train()
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
times = sorted(timer.times[1:])
print(json.dumps({"epoch": times[len(times) // 2], "added": peak - before,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def measure(model: str, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, model, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    print("alpha-SVRG (alpha constant 0.75, snapshot every epoch) vs AdamW, batch 128, 16 steps/epoch")
    print(f"{'model':<8}{'AdamW s/epoch':>15}{'snapshot s/epoch':>18}{'ratio':>8}{'cache s/epoch':>15}{'ratio':>8}"
          f"{'model MiB':>11}{'snapshot extra peak (models)':>30}")
    for model in ("vit", "mlp"):
        plain, snapshot, cache = (measure(model, mode) for mode in ("plain", "snapshot", "cache"))
        extra_models = (snapshot["added"] - plain["added"]) / snapshot["model_bytes"]
        print(f"{model:<8}{plain['epoch']:>15.3f}{snapshot['epoch']:>18.3f}{snapshot['epoch'] / plain['epoch']:>8.2f}"
              f"{cache['epoch']:>15.3f}{cache['epoch'] / plain['epoch']:>8.2f}"
              f"{snapshot['model_bytes'] / 2**20:>11.1f}{extra_models:>30.2f}")
    print("targets: time ratio <= 2.5 (snapshot mode), <= 1.7 (cache mode); extra peak memory <= 3 model-sized tensors")


if __name__ == "__main__":
    main()
