"""`run_self_distillation`: round k+1 learns from round k (spec section 7, test 5); saving; resume between and inside
rounds, bit for bit."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_regtools.self_distillation import DistillationTrainerMixin, load_round_model, run_self_distillation
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import dataset


class DistillTrainer(DistillationTrainerMixin, Trainer):
    pass


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.mse_loss(logits, labels)
        return out


def regression_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, generator=generator) * 2 - 1
    y = torch.sin(3 * x) + 0.3 * torch.randn(20, 1, generator=generator)
    return Dataset.from_dict({"x": x.numpy(), "labels": y.numpy()}).with_format("torch")


def args(output_dir, **kwargs):
    settings = dict(output_dir=output_dir, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                    logging_steps=1, report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
                    dataloader_num_workers=0, disable_tqdm=True, seed=0)
    settings.update(kwargs)
    return TrainingArguments(**settings)


def test_round_two_learns_round_ones_predictions(tmp_path):
    data, made = regression_data(), []

    def factory(model, teacher, *, round, output_dir):
        trainer = DistillTrainer(model, args(output_dir), train_dataset=data, teacher=teacher,
                                 distillation={"loss": "mse"}, distillation_round=round)
        made.append(trainer)
        return trainer

    results = run_self_distillation(Regressor, factory, rounds=2, output_dir=tmp_path, evaluate=False)
    assert [r.round for r in results] == [1, 2] and [r.status for r in results] == ["trained", "trained"]
    first, second = made
    assert first.teacher is None and second.teacher is not None and not second.teacher.training
    x = data[:]["x"]
    with torch.no_grad():
        round_one = first.model.eval()(x)["logits"]
        torch.testing.assert_close(second.teacher(x)["logits"], round_one, rtol=0, atol=0)
        student = load_round_model(Regressor, tmp_path / "round-2")
        assert not torch.equal(student(x)["logits"], round_one)
    second.model.train()
    batch = {"x": x[:8], "labels": data[:8]["labels"]}
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(second.model(x[:8])["logits"], round_one[:8])
        torch.testing.assert_close(second.compute_loss(second.model, batch), expected)
    logged = [entry["hf_regtools/self_distillation/round"] for entry in second.state.log_history if "loss" in entry]
    assert logged == [2] * 4
    record = json.loads((tmp_path / "round-2" / "round.json").read_text())
    assert record["round"] == 2 and record["train"]["train_loss"] > 0


VIT = {"model": "transformers_vit"}


def vit_factory(data, callbacks=()):
    def factory(model, teacher, *, round, output_dir):
        return DistillTrainer(model, args(output_dir), train_dataset=data, eval_dataset=data, teacher=teacher,
                              distillation={"loss": "kl", "temperature": 2.0, "alpha": 0.5},
                              distillation_round=round, callbacks=list(callbacks))
    return factory


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    def __init__(self, round, step):
        self.round, self.step, self.current = round, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(f"round-{self.round}") and state.global_step == self.step:
            raise Interrupt


def final_weights(folder):
    return load_file(folder / "round-3" / "model.safetensors")


@pytest.mark.parametrize("init", ["fresh", "warm"])
def test_resume_between_and_inside_rounds_is_bit_for_bit(init, tmp_path):
    data = dataset(VIT, size=20)
    model_init = lambda: tiny_models.transformers_vit()  # noqa: E731
    run_self_distillation(model_init, vit_factory(data), rounds=3, output_dir=tmp_path / "full", init=init)
    expected = final_weights(tmp_path / "full")

    # stopped after round 1, then continued
    run_self_distillation(model_init, vit_factory(data), rounds=1, output_dir=tmp_path / "between", init=init)
    results = run_self_distillation(model_init, vit_factory(data), rounds=3, output_dir=tmp_path / "between",
                                    init=init)
    assert [r.status for r in results] == ["found", "trained", "trained"]
    assert results[0].eval_metrics["eval_loss"] > 0
    actual = final_weights(tmp_path / "between")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)

    # interrupted inside round 2 at step 3 (before its checkpoint is written), then rerun from checkpoint-2
    with pytest.raises(Interrupt):
        run_self_distillation(model_init, vit_factory(data, [InterruptAt(2, 3)]), rounds=3,
                              output_dir=tmp_path / "inside", init=init)
    assert not (tmp_path / "inside" / "round-2" / "round.json").exists()
    results = run_self_distillation(model_init, vit_factory(data), rounds=3, output_dir=tmp_path / "inside", init=init)
    assert [r.status for r in results] == ["found", "resumed", "trained"]
    record = json.loads((tmp_path / "inside" / "round-2" / "round.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2")
    actual = final_weights(tmp_path / "inside")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert any(not torch.equal(expected[key], load_file(tmp_path / "full" / "round-2" / "model.safetensors")[key])
               for key in expected)


def test_each_round_is_a_loadable_model_folder(tmp_path):
    import timm
    from transformers import TimmWrapperForImageClassification

    case = {"model": "timm_wrapped_vit"}
    data = dataset(case, size=12)
    run_self_distillation(tiny_models.timm_wrapped_vit, vit_factory(data), rounds=2, output_dir=tmp_path,
                          evaluate=False)
    for round in (1, 2):
        folder = tmp_path / f"round-{round}"
        wrapped = TimmWrapperForImageClassification.from_pretrained(folder)
        bare = timm.create_model(f"local-dir:{folder}", pretrained=True)
        x = data[:4]["pixel_values"]
        with torch.no_grad():
            torch.testing.assert_close(bare.eval()(x), wrapped.eval()(pixel_values=x).logits)


def test_runner_errors(tmp_path):
    data = regression_data()

    def plain(model, teacher, *, round, output_dir):
        return Trainer(model, args(output_dir), train_dataset=data)

    with pytest.raises(TypeError, match="DistillationTrainerMixin"):
        run_self_distillation(Regressor, plain, rounds=1, output_dir=tmp_path / "a")

    def elsewhere(model, teacher, *, round, output_dir):
        return DistillTrainer(model, args(str(tmp_path / "other")), train_dataset=data, teacher=teacher)

    with pytest.raises(ValueError, match="round's folder"):
        run_self_distillation(Regressor, elsewhere, rounds=1, output_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="init must be one of"):
        run_self_distillation(Regressor, plain, rounds=1, output_dir=tmp_path, init="cold")
    (tmp_path / "c" / "round-1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="resume=True"):
        run_self_distillation(Regressor, plain, rounds=1, output_dir=tmp_path / "c", resume=False)
