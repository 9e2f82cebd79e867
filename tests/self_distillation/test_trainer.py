"""`DistillationTrainerMixin` (spec section 7, test 4) and the distillation loss."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from hf_regtools.self_distillation import (DistillationTrainerMixin, add_teacher_logits, distillation_loss,
                                           per_example_distillation_loss)
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import build_model, build_trainer, dataset

MIXIN = "hf_regtools.self_distillation:DistillationTrainerMixin"
VIT = {"model": "transformers_vit", "callbacks": [], "mixin": MIXIN, "deterministic": True}
PLAIN = {"model": "transformers_vit", "callbacks": [], "deterministic": True}


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def seeded(builder, seed=1, **kwargs):
    torch.manual_seed(seed)
    return builder(**kwargs)


def test_kl_and_mse_formulas():
    torch.manual_seed(0)
    s, t, labels = torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,))
    temperature = 3.0
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                                    log_target=True, reduction="none").sum(-1) * temperature ** 2
    torch.testing.assert_close(per_example_distillation_loss(s, t, loss="kl", temperature=temperature), kl)
    torch.testing.assert_close(per_example_distillation_loss(s, t, loss="mse"), ((s - t) ** 2).mean(1))
    mixed = distillation_loss(s, t, labels, loss="kl", temperature=temperature, alpha=0.25)
    torch.testing.assert_close(mixed, 0.75 * kl.mean() + 0.25 * torch.nn.functional.cross_entropy(s, labels))
    half = distillation_loss(s.half(), t.half(), loss="kl")
    assert half.dtype == torch.float32  # computed in fp32 under mixed precision


def test_alpha_one_is_the_plain_loss(tmp_path):
    teacher = seeded(tiny_models.transformers_vit)
    distilled = build_trainer(VIT, tmp_path / "d", max_steps=1,
                              trainer_init_kwargs={"teacher": teacher, "distillation": {"alpha": 1.0}})
    plain = build_trainer(PLAIN, tmp_path / "p", max_steps=1)
    batch = first_batch(plain)
    distilled.model.train(), plain.model.train()
    torch.testing.assert_close(distilled.compute_loss(distilled.model, dict(batch)),
                               plain.compute_loss(plain.model, dict(batch)), rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_a_copy_of_the_student_gives_zero_loss_and_zero_gradient(loss, tmp_path):
    model = build_model(VIT)
    trainer = build_trainer(VIT, tmp_path, max_steps=1, model=model,
                            trainer_init_kwargs={"teacher": copy.deepcopy(model), "distillation": {"loss": loss}})
    model.train()
    value = trainer.compute_loss(model, dict(first_batch(trainer)))
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-7)
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in model.parameters())


def test_teacher_is_frozen_on_the_students_device_and_not_checkpointed(tmp_path):
    teacher = seeded(tiny_models.transformers_vit).train()
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer = build_trainer(VIT, tmp_path, max_steps=3, save_steps=3, trainer_init_kwargs={"teacher": teacher})
    assert trainer.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.train()
    assert not teacher.training and type(trainer.teacher) is type(teacher)
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert next(teacher.parameters()).device == next(trainer.model.parameters()).device
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert len(saved) == len(trainer.model.state_dict())
    assert not [p for p in tmp_path.joinpath("checkpoint-3").iterdir() if "teacher" in p.name]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all({"hf_regtools/self_distillation/distill_loss", "hf_regtools/self_distillation/gt_loss"} <= set(entry)
               for entry in logs) and len(logs) == 3


def test_the_teacher_runs_under_the_students_autocast(tmp_path):
    teacher = seeded(tiny_models.transformers_vit)
    dtypes = []
    teacher.classifier.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trainer = build_trainer(VIT, tmp_path, max_steps=1, bf16=True, trainer_init_kwargs={"teacher": teacher})
    trainer.train()
    assert dtypes == [torch.bfloat16]


def test_evaluation_keeps_the_plain_loss(tmp_path):
    teacher = seeded(tiny_models.transformers_vit)
    eval_set = dataset(VIT, size=12, seed=3)
    distilled = build_trainer(VIT, tmp_path / "d", max_steps=1, trainer_init_kwargs={"teacher": teacher})
    plain = build_trainer(PLAIN, tmp_path / "p", max_steps=1)
    assert distilled.evaluate(eval_set)["eval_loss"] == plain.evaluate(eval_set)["eval_loss"]


def test_knowledge_distillation_from_a_bare_timm_model_of_another_size(tmp_path):
    """Any teacher with the student's label space: a bare timm ViT (forward(x)), wider than the student."""
    teacher = seeded(tiny_models.timm_vit, embed_dim=32, depth=2, num_classes=3)
    trainer = build_trainer(VIT, tmp_path, max_steps=2, trainer_init_kwargs={
        "teacher": teacher, "distillation": {"loss": "kl", "temperature": 2.0, "alpha": 0.5}})
    trainer.train()
    assert trainer.state.log_history[0]["hf_regtools/self_distillation/distill_loss"] > 0


def test_a_teacher_with_another_label_space_is_refused_clearly(tmp_path):
    teacher = seeded(tiny_models.transformers_vit, num_labels=5)
    trainer = build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={"teacher": teacher})
    with pytest.raises(ValueError, match=r"teacher's logits have shape \(8, 5\) but the student's \(8, 3\).*label "
                                         "space"):
        trainer.train()


def test_bad_settings_and_teachers(tmp_path):
    model = build_model(VIT)
    with pytest.raises(ValueError, match="the student itself"):
        build_trainer(VIT, tmp_path, max_steps=1, model=model, trainer_init_kwargs={"teacher": model})
    shared = torch.nn.ModuleDict({"inner": model.classifier})
    with pytest.raises(ValueError, match="shares 2 parameters"):
        build_trainer(VIT, tmp_path, max_steps=1, model=model, trainer_init_kwargs={"teacher": shared})
    with pytest.raises(ValueError, match=r"one of \('mse', 'kl'\)"):
        build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={"distillation": {"loss": "ce"}})
    with pytest.raises(ValueError, match="alpha"):
        build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={"distillation": {"alpha": 1.5}})
    with pytest.raises(ValueError, match="unknown settings"):
        build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={"distillation": {"temp": 2}})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={"teacher": "teacher-folder"})


def test_precomputed_targets_equal_online_ones_without_augmentation(tmp_path):
    teacher = seeded(tiny_models.transformers_vit)
    online = build_trainer(VIT, tmp_path / "o", max_steps=1,
                           trainer_init_kwargs={"teacher": teacher, "distillation": {"loss": "kl"}})
    batch = first_batch(online)
    online.model.train()
    expected = online.compute_loss(online.model, dict(batch))

    column = add_teacher_logits(dataset(VIT), copy.deepcopy(teacher))
    precomputed = build_trainer(VIT, tmp_path / "p", max_steps=1, remove_unused_columns=False,
                                trainer_init_kwargs={"distillation": {"loss": "kl", "targets": "precomputed"}})
    precomputed.train_dataset = column.with_format("torch")
    pre_batch = first_batch(precomputed)
    assert "teacher_logits" in pre_batch and torch.equal(pre_batch["labels"], batch["labels"])
    precomputed.model.train()
    torch.testing.assert_close(precomputed.compute_loss(precomputed.model, dict(pre_batch)), expected, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        precomputed.compute_loss(precomputed.model, {k: v for k, v in pre_batch.items() if k != "teacher_logits"})


def test_the_model_card_records_the_settings(tmp_path):
    teacher = seeded(tiny_models.transformers_vit)
    trainer = build_trainer(VIT, tmp_path, max_steps=1, trainer_init_kwargs={
        "teacher": teacher, "distillation": {"loss": "kl", "temperature": 4.0}, "distillation_round": 2})
    (use,) = [use for use in trainer.technique_uses() if use.name == "self_distillation"]
    assert use.settings["temperature"] == 4.0 and use.settings["round"] == 2
    assert json.dumps(use.settings)
    assert trainer.technique_metrics()["hf_regtools/self_distillation/round"] == 2
    assert isinstance(trainer, DistillationTrainerMixin)
