"""alpha-SVRG's full gradient `mu`: the same examples whatever the process count, and its faster larger-batch pass."""

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_regtools.alpha_svrg import AlphaSVRGConfig
from hf_regtools.testing.harness import build_model, build_trainer

from .distributed_run import VIT

ROOT = Path(__file__).resolve().parents[2]
SGD = dict(optim="sgd", learning_rate=0.05, max_grad_norm=0.0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, processes, *, svrg, batch, dataset_size, steps, accumulation=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(ROOT / "tests" / "alpha_svrg" / "distributed_run.py"), str(out),
               "--svrg", svrg, "--batch", str(batch), "--dataset-size", str(dataset_size), "--steps", str(steps),
               "--accumulation", str(accumulation)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(processes)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("svrg, dataset_size, accumulation", [
    ('{"mode": "snapshot", "snapshot_every": 2}', 60, 1), ('{"mode": "cache"}', 60, 1),
    ('{"mode": "snapshot", "snapshot_every": 2}', 62, 2)], ids=["snapshot", "cache", "snapshot-accumulation-2"])
def test_two_processes_equal_one_process_when_the_epoch_ends_with_a_short_step(tmp_path, svrg, dataset_size,
                                                                                accumulation):
    """60 examples at a global batch of 8: the epoch's 8th step is short on 1 process (4 examples) and padded with 4
    repeated examples on 2 processes (Accelerate's even batches). mu is over the 7 full steps in both cases, so the
    runs agree; training stops before the short step, whose own gradient differs between the two. (62 examples in
    micro-batches of 2 x 2 processes x 2 accumulation, or 4 x 1 x 2: the same with a padded last micro-batch.)"""
    settings = dict(svrg=svrg, dataset_size=dataset_size, steps=7, accumulation=accumulation)
    rank0, rank1 = launch(tmp_path / "two", 2, batch=4 // accumulation, **settings)
    (single,) = launch(tmp_path / "one", 1, batch=8 // accumulation, **settings)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=0)


def per_example_mean_gradient(model, examples):
    total = [torch.zeros_like(p) for p in model.parameters()]
    for example in examples:
        loss = model(**{k: v[None] for k, v in example.items()}).loss
        for t, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
            t.add_(g)
    return torch.cat([t.reshape(-1) / len(examples) for t in total])


def epoch_examples(trainer, epoch):
    dataloader = trainer.get_train_dataloader()
    dataloader.set_epoch(epoch)
    return [{k: v[i] for k, v in batch.items()} for batch in dataloader for i in range(len(batch["labels"]))]


@pytest.mark.parametrize("mode, accumulation", [("snapshot", 1), ("snapshot", 2), ("cache", 1), ("cache", 2)])
def test_mu_is_the_mean_per_example_gradient_over_the_full_steps(tmp_path, mode, accumulation):
    """60 examples, batch 4: full steps of 8 (accumulation 2: of 8 in two micro-batches) cover the epoch's first 56
    examples; mu at the initial weights is the mean of their 56 per-example gradients, computed one by one."""
    trainer = build_trainer(VIT, tmp_path, max_steps=1, batch_size=8 // accumulation, dataset_size=60,
                            gradient_accumulation_steps=accumulation, **SGD,
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.75, "mode": mode}})
    trainer.train()
    examples = epoch_examples(trainer, 0)
    assert len(examples) == 60
    mu = model_order_mu(trainer)
    expected = per_example_mean_gradient(build_model(VIT), examples[:56])
    torch.testing.assert_close(mu, expected, atol=1e-6, rtol=1e-5)
    assert (mu - per_example_mean_gradient(build_model(VIT), examples)).abs().max() > 1e-5, "the last 4 count"


def full_gradient(tmp_path, name, case=VIT, **svrg):
    trainer = build_trainer(case, tmp_path / name, max_steps=1, dataset_size=60, **SGD,
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.75, **svrg}})
    trainer.train()
    return model_order_mu(trainer)


def model_order_mu(trainer):
    """mu flattened in `model.parameters()` order (the optimizer's groups order it differently)."""
    optimizer = trainer.svrg_optimizer
    by_parameter = dict(zip(map(id, optimizer.parameters()), optimizer.full_gradient))
    return torch.cat([by_parameter[id(p)].reshape(-1) for p in trainer.model.parameters()])


def test_full_gradient_in_larger_batches_gives_the_same_mu(tmp_path):
    per_batch = full_gradient(tmp_path, "per-batch")
    for size in (32, 56, 64):
        torch.testing.assert_close(full_gradient(tmp_path, str(size), full_gradient_batch_size=size), per_batch,
                                   atol=1e-6, rtol=1e-5)


def test_full_gradient_batch_size_is_refused_where_it_changes_mu(tmp_path):
    with pytest.raises(ValueError, match="applies to mode='snapshot'"):
        AlphaSVRGConfig(mode="cache", full_gradient_batch_size=32)
    with pytest.raises(ValueError, match="positive number of examples"):
        AlphaSVRGConfig(full_gradient_batch_size=0)
    with pytest.raises(ValueError, match="multiple of per_device_train_batch_size"):
        full_gradient(tmp_path, "odd", full_gradient_batch_size=12)
    trainer = build_trainer(VIT, tmp_path / "bn", max_steps=1, **SGD,
                            trainer_init_kwargs={"alpha_svrg": {"full_gradient_batch_size": 16}})
    trainer.model.add_module("norm", torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="its BatchNorm1d layers normalise with batch statistics"):
        trainer.train()


def test_no_full_step_raises(tmp_path):
    trainer = build_trainer(VIT, tmp_path, max_steps=1, dataset_size=6, **SGD)
    with pytest.raises(ValueError, match="6 training examples make none of the global batch 8"):
        trainer.train()


def test_clipping_by_the_trainer_warns_once(tmp_path):
    trainer = build_trainer(VIT, tmp_path / "clip", max_steps=1, optim="sgd", learning_rate=0.05)
    assert trainer.args.max_grad_norm == 1.0
    with pytest.warns(UserWarning, match=r"max_grad_norm=1.0 .* TrainingArguments\(max_grad_norm=0\)") as record:
        trainer.train()
        trainer.train()
    assert sum("max_grad_norm" in str(w.message) for w in record) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_trainer(VIT, tmp_path / "paper", max_steps=1, **SGD).train()
    assert not [w for w in record if "max_grad_norm" in str(w.message)]


def test_snapshot_interval_longer_than_an_epoch_raises(tmp_path):
    trainer = build_trainer(VIT, tmp_path, max_steps=1, **SGD, trainer_init_kwargs={"alpha_svrg": {
        "snapshot_every": 9}})
    with pytest.raises(ValueError, match=r"snapshot_every=9\) is longer than an epoch \(8 optimizer steps\)"):
        trainer.train()


def test_svrg_end_switches_svrg_off_after_that_epoch(tmp_path):
    """The official `--svrg_end k`: SVRG in epochs 0..k, then the base optimizer; the schedule keeps its epochs."""
    trainer = build_trainer(VIT, tmp_path, max_steps=-1, num_train_epochs=3, dataset_size=16, **SGD,
                            trainer_init_kwargs={"alpha_svrg": {"svrg_end": 0}})
    refreshes = []
    refresh = trainer.refresh_snapshot
    trainer.refresh_snapshot = lambda: (refreshes.append(trainer.state.global_step), refresh())[1]
    trainer.train()
    assert refreshes == [0]
    assert [trainer.alpha_at(step) for step in range(6)] == [0.75, 0.75, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="svrg_end"):
        AlphaSVRGConfig(svrg_end=-1)
