"""TwoStreamTrainerMixin under DDP (2 CPU processes, gloo, torchrun): target-only runs (`mu = 0`) train without
unused-parameter errors and equal 1 process with the global batch, and the variant without labels keeps the unused
source head out of DDP too."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_regtools.data_selection import TwoHeadModel, TwoStreamTrainerMixin
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import dataset

CASE = {"model": "transformers_vit"}


class TwoStreamTrainer(TwoStreamTrainerMixin, Trainer):
    pass


def build(output_dir, *, batch, fixmatch=False):
    torch.manual_seed(0)
    net = TwoHeadModel(tiny_models.transformers_vit(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 3, 5)
    args = TrainingArguments(str(output_dir), max_steps=3, per_device_train_batch_size=batch, learning_rate=0.05,
                             optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none",
                             use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
                             ddp_find_unused_parameters=False)
    two_stream = {"mu": 0.0}
    if fixmatch:  # the variant without labels trains the target head alone, on target and source images
        two_stream = {"mu": 1.0, "fixmatch": True, "lambda_u": 1.0, "source_dataset": dataset(CASE, 16, seed=1),
                      "strong_transform": flip}
    return TwoStreamTrainer(model=net, args=args, train_dataset=dataset(CASE, 32), two_stream=two_stream)


def flip(image):
    return image.flip(-1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, fixmatch):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, str(out), str(fixmatch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("fixmatch", [False, True], ids=["mu=0", "fixmatch"])
def test_source_head_outside_the_loss_stays_out_of_ddp(fixmatch, tmp_path):
    # ddp_find_unused_parameters=False (the Trainer's default for a PreTrainedModel): a source head in DDP's reduction
    # without a gradient fails at the second step
    ranks = launch(tmp_path / "two", fixmatch)
    single = build(tmp_path / "one", batch=8, fixmatch=fixmatch)
    start = {name: p.detach().clone() for name, p in single.model.named_parameters()}
    assert not any(p.requires_grad for p in single.model.source_head.parameters())
    for name in start:
        torch.testing.assert_close(ranks[1][name], ranks[0][name], atol=0, rtol=0, msg=name)
    assert all(torch.equal(ranks[0][n], start[n]) for n in start if n.startswith("source_head"))
    assert not torch.equal(ranks[0]["classifier.classifier.weight"], start["classifier.classifier.weight"])
    if not fixmatch:  # target only: 2 processes x 4 = 1 process x 8 (no BatchNorm, no dropout)
        single.train()
        for name, value in single.model.named_parameters():
            torch.testing.assert_close(ranks[0][name], value.detach(), atol=1e-6, rtol=0, msg=name)


if __name__ == "__main__":
    out, fixmatch = sys.argv[1], sys.argv[2] == "True"
    run = build(out, batch=4, fixmatch=fixmatch)
    run.train()
    os.makedirs(out, exist_ok=True)
    torch.save({name: p.detach().clone() for name, p in run.model.named_parameters()},
               os.path.join(out, f"rank{run.args.process_index}.pt"))
