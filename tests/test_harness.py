"""The generic harness (hf_integration.md §12), parametrized over every registered Trainer-side technique."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import REQUIRED_KEYS, build_model, build_trainer, cases, dataset

CASES = [pytest.param(case, id=f"{technique}-{name}") for technique, name, case in cases()]
LAUNCH = [pytest.param(technique, name, case, id=f"{technique}-{name}") for technique, name, case in cases()]


def test_every_trainer_technique_has_harness_cases():
    from hf_regtools._registry import list_techniques

    trainer_side = [info for info in list_techniques() if info.has_trainer_component]
    assert trainer_side, "no Trainer-side technique registered"
    for info in trainer_side:
        assert info.harness and info.harness.get("cases"), f"{info.name} has no harness cases"
        for name, case in info.harness["cases"].items():
            missing = [key for key in REQUIRED_KEYS if key not in case]
            assert not missing, f"{info.name}/{name} lacks harness settings {missing}"


@pytest.mark.parametrize("model", sorted(tiny_models.INPUTS))
def test_every_fixture_trains_on_its_dataset(model):
    case = {"model": model}
    batch = dataset(case, size=5)[:5]
    built = build_model(case)
    loss = built(**batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in built.parameters() if p.requires_grad)


def technique_state(trainer):
    return trainer.technique_metrics()


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_equal_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_tensors(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("case", CASES)
def test_train_twice_with_the_same_objects(case, tmp_path):
    trainer = build_trainer(case, tmp_path, max_steps=2)
    trainer.train()
    after_first = parameters(trainer.model)
    trainer.train()
    assert any(not torch.equal(after_first[k], v) for k, v in parameters(trainer.model).items())
    assert technique_state(trainer)


@pytest.mark.parametrize("case", CASES)
def test_resume_equals_uninterrupted_run(case, tmp_path):
    # 20 examples in batches of 8: the epoch ends at step 3 with a batch of 4, so the resumed run crosses it
    full = build_trainer(case, tmp_path / "full", max_steps=4, save_steps=1, dataset_size=20)
    full.train()
    resumed = build_trainer(case, tmp_path / "resumed", max_steps=4, save_steps=1, dataset_size=20)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    assert_equal_tensors(parameters(full.model), parameters(resumed.model))
    load = lambda run: torch.load(tmp_path / run / "checkpoint-4" / "optimizer.pt", weights_only=False)  # noqa: E731
    assert_equal_tensors(load("full"), load("resumed"))
    assert technique_state(full) == technique_state(resumed)
    callbacks = lambda run: json.loads((tmp_path / run / "checkpoint-4" / "trainer_state.json").read_text())[  # noqa: E731
        "stateful_callbacks"]
    assert callbacks("full") == callbacks("resumed")

    from safetensors.torch import load_file

    step2 = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    step4 = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(step2[k], step4[k]) for k in step2)


ACCUMULATION_CASES = [pytest.param(case, id=f"{technique}-{name}") for technique, name, case in cases()
                      if case.get("accumulation_equivalent")]


@pytest.mark.parametrize("case", ACCUMULATION_CASES)
def test_accumulation_equals_whole_batch(case, tmp_path):
    # hf_integration.md §5: a per-update term (a regularizer, a KL) counts once per optimizer step, so batch 8 x GA 1
    # and batch 4 x GA 2 give the same updates (cases marked "accumulation_equivalent": no BatchNorm, no randomness)
    whole = build_trainer(case, tmp_path / "whole", max_steps=3, batch_size=8)
    whole.train()
    accumulated = build_trainer(case, tmp_path / "accumulated", max_steps=3, batch_size=4,
                                gradient_accumulation_steps=2)
    accumulated.train()
    for name, value in parameters(whole.model).items():
        torch.testing.assert_close(parameters(accumulated.model)[name], value, atol=1e-6, rtol=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Not a multiple of the global batch (8), so each epoch ends with a smaller batch: full-data passes (alpha-SVRG's mu) see
# it; the 3 training steps stop before it (Accelerate pads each process's share of it with wrapped-around examples, so
# even plain training differs between 1 and 2 processes on that step).
LAUNCH_DATASET_SIZE = 28


def launch(technique, name, out, processes, batch):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "hf_regtools.testing.harness", technique, name,
               str(out), "--steps", "3", "--batch", str(batch), "--dataset-size", str(LAUNCH_DATASET_SIZE)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(processes)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("technique, name, case", LAUNCH)
def test_two_processes_agree(technique, name, case, tmp_path):
    rank0, rank1 = launch(technique, name, tmp_path / "two", 2, batch=4)
    assert_equal_tensors(rank0, rank1)
    if case["deterministic"]:
        (single,) = launch(technique, name, tmp_path / "one", 1, batch=8)
        for key in single:
            torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=0)
