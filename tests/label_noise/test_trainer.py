"""Label noise in the Trainer: `compute_loss_func` and the mixin; training only, resume, models without HF outputs."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_regtools.label_noise import LabelNoiseLoss, LabelNoiseTrainerMixin, label_noise_loss
from hf_regtools.label_noise.trainer import NOT_A_CALLBACK
from hf_regtools.testing.harness import build_model, dataset

CASE = {"model": "mlp_classifier"}


class RecordingLoss(LabelNoiseLoss):
    """Records `(step, micro-batch, noisy targets)` of every training call."""

    def __init__(self, config):
        super().__init__(config)
        self.record = []

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if torch.is_grad_enabled():
            from hf_regtools.label_noise import noisy_targets

            offset, total = self.rows(labels.shape[0])
            self.record.append((self.step, self.micro_batch,
                                noisy_targets(labels, self.config, seed=self.seed, step=self.step, offset=offset,
                                              total=total)))
        return super().__call__(outputs, labels, num_items_in_batch)


def arguments(path, **kwargs):
    settings = dict(output_dir=str(path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                    report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **kwargs})


def test_compute_loss_func_trains_on_noise_and_evaluates_on_clean_labels(tmp_path):
    train, test = dataset(CASE, size=20), dataset(CASE, size=12, seed=1)
    loss = label_noise_loss("flip", p=1.0, num_classes=3)
    noisy = Trainer(build_model(CASE), arguments(tmp_path / "noisy"), train_dataset=train, eval_dataset=test,
                    compute_loss_func=loss, callbacks=[loss])
    noisy.train()
    plain = Trainer(build_model(CASE), arguments(tmp_path / "plain"), train_dataset=train)
    plain.train()
    assert any(not torch.equal(a, b) for a, b in zip(noisy.model.parameters(), plain.model.parameters()))
    with torch.no_grad():
        noisy.model.eval()
        columns = test[:]
        clean = torch.nn.functional.cross_entropy(noisy.model(pixel_values=columns["pixel_values"])["logits"],
                                                  columns["labels"])
    assert noisy.evaluate()["eval_loss"] == pytest.approx(float(clean), rel=1e-5)
    logged = [entry for entry in noisy.state.log_history if "hf_regtools/label_noise/p" in entry]
    assert logged and logged[0]["hf_regtools/label_noise/p"] == 1.0


def test_the_loss_without_its_callback_raises(tmp_path):
    loss = label_noise_loss("flip", p=0.2, num_classes=3)
    trainer = Trainer(build_model(CASE), arguments(tmp_path), train_dataset=dataset(CASE, size=20),
                      compute_loss_func=loss)
    with pytest.raises(RuntimeError, match="callbacks=\\[loss\\]"):
        trainer.train()
    assert "compute_loss_func=loss, callbacks=[loss]" in NOT_A_CALLBACK


def test_resumed_run_draws_the_same_noise(tmp_path):
    from hf_regtools.label_noise import LabelNoiseConfig

    runs = {}
    for name, resume in (("full", None), ("resumed", str(tmp_path / "full" / "checkpoint-2"))):
        loss = RecordingLoss(LabelNoiseConfig(kind="regression", sigma=0.5, noise="gaussian", seed=3))
        data = dataset(CASE, size=24).map(lambda row: {"labels": float(row["labels"])})
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1))

        class Regressor(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

            def forward(self, pixel_values):
                return self.net(pixel_values)  # a plain tensor, no HF-style outputs

        trainer = Trainer(Regressor(), arguments(tmp_path / name, save_strategy="steps", save_steps=1,
                                                 per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                                 label_names=["labels"]),
                          train_dataset=data.with_format("torch"), compute_loss_func=loss, callbacks=[loss])
        trainer.train(resume_from_checkpoint=resume)
        runs[name] = (loss.record, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    full, resumed = runs["full"][0], runs["resumed"][0]
    assert [(s, m) for s, m, _ in full] == [(s, m) for s in range(4) for m in range(2)]
    assert [(s, m) for s, m, _ in resumed] == [(s, m) for s in (2, 3) for m in range(2)]
    for (_, _, a), (_, _, b) in zip(full[4:], resumed):
        assert torch.equal(a, b)
    for key, value in runs["full"][1].items():
        assert torch.equal(value, runs["resumed"][1][key])


class TensorModel(torch.nn.Module):
    """Returns the logits as a plain tensor (no `ModelOutput`, no loss)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 3)

    def forward(self, pixel_values):
        return self.linear(pixel_values.flatten(1))


def test_mixin_on_a_model_without_hf_outputs_noises_only_in_training_mode(tmp_path):
    class T(LabelNoiseTrainerMixin, Trainer):
        pass

    torch.manual_seed(0)
    trainer = T(TensorModel(), arguments(tmp_path), train_dataset=dataset(CASE, size=20),
                label_noise={"kind": "soft_mse", "sigma": 1.0, "num_classes": 3})
    trainer.train()
    batch = dataset(CASE, size=8)[:8]
    trainer.model.eval()
    with torch.enable_grad():  # gradients on, model in eval mode: no noise (the mixin checks model.training)
        loss = trainer.compute_loss(trainer.model, dict(batch))
    expected = 0.5 * ((trainer.model(batch["pixel_values"]) - torch.nn.functional.one_hot(batch["labels"], 3)) ** 2
                      ).sum() / 8
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert trainer.technique_uses()[0].settings == {"kind": "soft_mse", "sigma": 1.0, "num_classes": 3,
                                                     "noise": "rademacher"}


def test_mixin_rejects_a_second_loss_and_missing_settings(tmp_path):
    class T(LabelNoiseTrainerMixin, Trainer):
        pass

    with pytest.raises(ValueError, match="needs label_noise"):
        T(TensorModel(), arguments(tmp_path))
    with pytest.raises(ValueError, match="sets compute_loss_func itself"):
        T(TensorModel(), arguments(tmp_path), label_noise={"kind": "flip", "p": 0.1, "num_classes": 3},
          compute_loss_func=lambda *a, **k: 0)
