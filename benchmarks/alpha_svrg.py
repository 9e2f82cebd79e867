"""Benchmark: alpha-SVRG epoch time against AdamW, like with like, optionally beside the official code.

The workload of issue 7: a timm ViT (image 32, patch 4, embed 96, depth 4, 3 heads, 10 classes), 2,560 random
samples, AdamW lr 4e-3 (weight decay 0.05, constant LR), batch 128 (20 steps per epoch), alpha 0.75 linear over 5
epochs, snapshot every epoch, no clipping, CPU. Each configuration runs in a fresh process with the same number of
threads; its time is the median epoch of epochs 2..E-1 (the first warms up; in the last alpha is 0, which
hf_regtools skips and the official code still pays for).

Rows:

- `torch Dataset`: the data is an in-memory torch `Dataset` of ready tensors, the same data work as the official
  code's `DataLoader` (AdamW, cache mode, snapshot mode, and snapshot mode with
  `AlphaSVRGConfig(full_gradient_batch_size=...)`, the faster full-gradient pass);
- `datasets with_format("torch")`: the data-pipeline case, a `datasets.Dataset` formatted to torch on every batch;
  cache mode reads each batch once per epoch where AdamW and snapshot mode read it once and twice;
- `official` (with `--official PATH`, a checkout of davidyyd/alpha-SVRG): its `engine.train_one_epoch` with
  `svrg.Cache_SVRG` / `svrg.Vanilla_SVRG` / plain AdamW, imported from PATH at run time, on the same model, data
  (a `TensorDataset` `DataLoader`, shuffled, drop_last) and threads. Its `utils.py` imports modules that current
  stacks lack (`torch._six`, `tensorboardX`, its model zoo): they are stubbed, and `torch.cuda.synchronize` is a
  no-op on a CPU-only machine. Nothing of it is copied here.

    python benchmarks/alpha_svrg.py [--official /tmp/alpha-SVRG] [--threads 2]
    python benchmarks/alpha_svrg.py --quick      # tiny sizes, to check the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, math, sys, tempfile, time, types
import torch
settings = json.loads(sys.argv[1])
torch.set_num_threads(settings["threads"])
torch.manual_seed(0)
import timm

def vit():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=96, depth=settings["depth"], num_heads=3, num_classes=10)

g = torch.Generator().manual_seed(0)
pixels = torch.randn(settings["samples"], 3, 32, 32, generator=g)
labels = torch.randint(0, 10, (settings["samples"],), generator=g)
epochs, batch, steps = settings["epochs"], settings["batch"], settings["samples"] // settings["batch"]

def peak_rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

def report(times, before):
    timed = sorted(times[1:-1] or times[1:] or times)
    print(json.dumps({"epoch": timed[len(timed) // 2], "epochs": times, "added": peak_rss() - before}))

def official(mode):
    sys.path.insert(0, settings["official"])
    sys.modules["models"] = types.SimpleNamespace(MLP=None)
    for name, attributes in (("torch._six", {"inf": math.inf}), ("tensorboardX", {"SummaryWriter": object})):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attributes)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
    import engine, svrg
    model = vit()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, labels), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=0)
    base = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    snapshot_model = None
    if mode == "cache":
        optimizer = svrg.Cache_SVRG(base)
    elif mode == "snapshot":
        snapshot_model = vit()
        optimizer = svrg.Vanilla_SVRG(base, torch.optim.AdamW(snapshot_model.parameters(), lr=4e-3))
    else:
        optimizer = base
    schedules = {"svrg": svrg.svrg_scheduler(0.75, epochs, steps, steps, "linear")} if mode != "plain" else {}
    times, before = [], peak_rss()
    for epoch in range(epochs):
        start = time.perf_counter()
        engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), loader, optimizer, torch.device("cpu"), epoch,
                               None, max_norm=0, start_steps=epoch * steps, schedules=schedules,
                               num_training_steps_per_epoch=steps, update_freq=1, snapshot_pass_freq=steps,
                               use_svrg=mode != "plain", model_without_ddp=model, use_cache_svrg=mode == "cache",
                               snapshot_model=snapshot_model)
        times.append(time.perf_counter() - start)
    report(times, before)

def ours(mode, data):
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from hf_regtools.alpha_svrg import AlphaSVRGTrainerMixin
    from hf_regtools.trainer import RegtoolsTrainerMixin

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = vit()
        def forward(self, pixel_values, labels=None):
            logits = self.model(pixel_values)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Tensors(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)
        def __getitem__(self, i):
            return {"pixel_values": pixels[i], "labels": labels[i]}

    if data == "datasets":
        from datasets import Dataset
        train = Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.numpy()}).with_format("torch")
    else:
        train = Tensors()

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.times = []
        def on_epoch_begin(self, *args, **kwargs):
            self.start = time.perf_counter()
        def on_epoch_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    class Plain(RegtoolsTrainerMixin, Trainer):
        pass

    class SVRG(AlphaSVRGTrainerMixin, Trainer):
        pass

    timer = EpochTimer()
    args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=epochs, per_device_train_batch_size=batch,
                             learning_rate=4e-3, weight_decay=0.05, lr_scheduler_type="constant", max_grad_norm=0.0,
                             report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_drop_last=True, dataloader_num_workers=0, seed=0)
    kwargs = {}
    if mode != "plain":
        svrg = {"alpha0": 0.75, "kind": "linear", "mode": "snapshot" if mode == "full-batch" else mode}
        if mode == "full-batch":
            svrg["full_gradient_batch_size"] = settings["full_gradient_batch_size"]
        kwargs["alpha_svrg"] = svrg
    trainer = (Plain if mode == "plain" else SVRG)(model=Classifier(), args=args, train_dataset=train,
                                                   callbacks=[timer], **kwargs)
    before = peak_rss()
    trainer.train()
    report(timer.times, before)

implementation, mode, data = settings["run"]
official(mode) if implementation == "official" else ours(mode, data)
"""

FULL = dict(samples=2560, batch=128, epochs=5, depth=4)
QUICK = dict(samples=192, batch=32, epochs=3, depth=1)
OURS = [("plain", "AdamW"), ("cache", "alpha-SVRG cache mode"), ("snapshot", "alpha-SVRG snapshot mode"),
        ("full-batch", "snapshot mode, full_gradient_batch_size={fgb}")]
OFFICIAL = [("plain", "AdamW (official engine)"), ("cache", "Cache_SVRG"), ("snapshot", "Vanilla_SVRG")]


def measure(settings: dict, run: tuple[str, str, str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(settings["threads"]),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**settings, "run": run})], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    parser.add_argument("--official", type=Path, help="a checkout of davidyyd/alpha-SVRG to run side by side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every configuration")
    args = parser.parse_args()
    if args.official is not None and not (args.official / "svrg.py").is_file():
        parser.error(f"--official {args.official}: no svrg.py there; give a checkout of davidyyd/alpha-SVRG")
    settings = dict(QUICK if args.quick else FULL, threads=args.threads,
                    official=str(args.official.resolve()) if args.official else None)
    settings["full_gradient_batch_size"] = 4 * settings["batch"]
    steps = settings["samples"] // settings["batch"]
    print(f"timm ViT depth {settings['depth']}, {settings['samples']} samples, batch {settings['batch']} ({steps} "
          f"steps/epoch), {settings['epochs']} epochs, AdamW lr 4e-3, alpha 0.75 linear, {args.threads} threads")
    print(f"{'implementation':<16}{'data':<32}{'configuration':<48}{'s/epoch':>9}{'x AdamW':>9}{'+peak MiB':>11}")
    rows = [("hf_regtools", "torch Dataset", mode, label) for mode, label in OURS]
    rows += [("hf_regtools", "datasets with_format('torch')", mode, label) for mode, label in OURS[:3]]
    if args.official is not None:
        rows += [("official", "torch DataLoader", mode, label) for mode, label in OFFICIAL]
    baseline = {}
    for implementation, data, mode, label in rows:
        result = measure(settings, (implementation, mode, "datasets" if data.startswith("datasets") else "torch"))
        baseline.setdefault((implementation, data), result["epoch"])
        ratio = result["epoch"] / baseline[(implementation, data)]
        print(f"{implementation:<16}{data:<32}{label.format(fgb=settings['full_gradient_batch_size']):<48}"
              f"{result['epoch']:>9.3f}{ratio:>9.2f}{result['added'] / 2**20:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
