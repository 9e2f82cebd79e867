"""Benchmark: a Trainer step with distillation from a same-size frozen teacher against a plain step, in the same run.

The workload: a transformers ViT (ViT-Tiny width 192, `--depth` 12 blocks, 3 heads; 32x32 input in 4x4 patches, 10
classes), batch 32, AdamW, CPU (or `--device cuda`). Two Trainers on the same data: `RegtoolsTrainerMixin` (plain) and
`DistillationTrainerMixin` with a teacher of the student's architecture (`--loss kl`, the teacher's forward under
`no_grad` counted in the step). They train in alternating blocks of `--block` steps (plain, distilled, plain, ...) so
that drifts in machine load hit both alike; a callback times each optimizer step (`on_step_begin` to `on_step_end`),
the first step of each block left out. Printed: the median step time of each, their ratio (target <= 1.4x), and the
teacher's forward alone.

    python benchmarks/self_distillation.py [--threads 2] [--steps 40] [--depth 12] [--device cpu] [--bf16]
    python benchmarks/self_distillation.py --quick      # a tiny ViT and few steps, to check the script end to end
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    parser.add_argument("--block", type=int, default=6, help="steps per block of one kind (the first is not timed)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--loss", default="kl", choices=("kl", "mse"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (teacher and student)")
    parser.add_argument("--quick", action="store_true", help="tiny ViT, 6 steps of each kind")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

    from hf_regtools.self_distillation import DistillationTrainerMixin, teacher_logits_of
    from hf_regtools.trainer import RegtoolsTrainerMixin

    torch.set_num_threads(args.threads)
    width, depth, heads = (16, 2, 2) if args.quick else (192, args.depth, 3)
    if args.quick:
        args.steps, args.block = 6, 3

    def vit(seed):
        torch.manual_seed(seed)
        return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=width,
                                                   num_hidden_layers=depth, num_attention_heads=heads,
                                                   intermediate_size=4 * width, num_labels=10))

    generator = torch.Generator().manual_seed(0)
    size = args.batch * (args.block + 1)
    data = Dataset.from_dict({"pixel_values": torch.randn(size, 3, 32, 32, generator=generator).numpy(),
                              "labels": torch.randint(0, 10, (size,), generator=generator).numpy()}
                             ).with_format("torch")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            if state.global_step > 1:  # the block's first step (allocations, warm-up) is not timed
                self.times.append(time.perf_counter() - self._start)

    class Plain(RegtoolsTrainerMixin, Trainer):
        pass

    class Distilled(DistillationTrainerMixin, Trainer):
        pass

    output = tempfile.mkdtemp()
    settings = dict(max_steps=args.block, per_device_train_batch_size=args.batch, learning_rate=1e-4,
                    report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
                    use_cpu=args.device == "cpu", bf16=args.bf16, dataloader_num_workers=0)
    timers = {"plain": StepTimer(), "distilled": StepTimer()}
    trainers = {
        "plain": Plain(vit(0), TrainingArguments(output_dir=output + "/p", **settings), train_dataset=data,
                       callbacks=[timers["plain"]]),
        "distilled": Distilled(vit(0), TrainingArguments(output_dir=output + "/d", **settings), train_dataset=data,
                               callbacks=[timers["distilled"]], teacher=vit(1), distillation={"loss": args.loss}),
    }
    while min(len(t.times) for t in timers.values()) < args.steps:
        for trainer in trainers.values():
            trainer.train()

    teacher = trainers["distilled"].teacher
    batch = {"pixel_values": data[:args.batch]["pixel_values"].to(next(teacher.parameters()).device)}
    forward = []
    for _ in range(max(5, args.steps // 4)):
        start = time.perf_counter()
        with torch.no_grad(), trainers["distilled"].accelerator.autocast():
            teacher_logits_of(teacher, batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        forward.append(time.perf_counter() - start)

    plain = statistics.median(timers["plain"].times[:args.steps])
    distilled = statistics.median(timers["distilled"].times[:args.steps])
    result = {"model": f"ViT width {width}, depth {depth}, 32x32/4, batch {args.batch}", "device": args.device,
              "threads": args.threads, "bf16": args.bf16, "loss": args.loss, "steps": args.steps,
              "plain_step_s": round(plain, 5), "distilled_step_s": round(distilled, 5),
              "ratio": round(distilled / plain, 3), "teacher_forward_s": round(statistics.median(forward), 5),
              "target": "<= 1.4x"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
