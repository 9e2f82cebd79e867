"""Trainer adapters of the large initial learning rate: the scheduler mixin (epochs under gradient accumulation), the
patch transform's epoch callback, the activation-noise callback (annealing, off in eval, resume)."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_regtools.large_lr import (ActivationNoiseCallback, LargeLRTrainerMixin, PatchEpochCallback, PatchTransform,
                                  large_initial_lr_schedule)
from hf_regtools.testing import tiny_models


class Trainer_(LargeLRTrainerMixin, Trainer):
    pass


class Record(TrainerCallback):
    def __init__(self):
        self.lrs, self.epochs = [], []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def mlp_dataset(n=20):
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"pixel_values": torch.randn(n, 3, 8, 8, generator=generator).numpy(),
                              "labels": (torch.arange(n) % 3).numpy()}).with_format("torch")


def args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, optim="sgd",
                             logging_steps=1, **kw)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_mixin_decays_at_the_1_based_epoch_with_the_trainer_steps_per_epoch(tmp_path, accumulation):
    # 20 examples in batches of 4: 5 batches, ceil(5 / GA) updates per epoch
    record = Record()
    trainer = Trainer_(model=tiny_models.mlp_classifier(), args=args(tmp_path, num_train_epochs=4,
                                                                     gradient_accumulation_steps=accumulation),
                       train_dataset=mlp_dataset(), callbacks=[record], large_lr={"milestones": (3,)})
    trainer.train()
    per_epoch = -(-5 // accumulation)
    expected = [0.1 if step // per_epoch + 1 < 3 else 0.004 for step in range(4 * per_epoch)]
    assert record.lrs == pytest.approx(expected)
    assert trainer.technique_metrics()["hf_regtools/large_lr/lr_factor"] == pytest.approx(0.04)


def test_the_factory_works_through_trainer_optimizers(tmp_path):
    model = tiny_models.mlp_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = Record()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=mlp_dataset(), callbacks=[record],
                      optimizers=(optimizer, large_initial_lr_schedule(optimizer, milestones=(4,), unit="steps")))
    trainer.train()
    assert record.lrs == pytest.approx([0.1] * 4 + [0.004] * 2)


def test_mixin_rejects_warmup_and_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="warmup"):
        Trainer_(model=tiny_models.mlp_classifier(), args=args(tmp_path, warmup_steps=2), train_dataset=mlp_dataset())
    with pytest.raises(ValueError, match="unknown large_lr settings"):
        Trainer_(model=tiny_models.mlp_classifier(), args=args(tmp_path), train_dataset=mlp_dataset(),
                 large_lr={"gamma": 0.1})


def test_patch_epoch_callback_sets_the_epoch_of_the_transform(tmp_path):
    rows = mlp_dataset().with_format(None).map(lambda _, i: {"idx": i}, with_indices=True)
    transform = PatchTransform(num_classes=3, patch=3, channels=3)
    rows.set_transform(transform)
    seen = []

    class Seen(TrainerCallback):
        def on_step_begin(self, *a, **k):
            seen.append(transform.epoch)

    trainer = Trainer(model=tiny_models.mlp_classifier(), args=args(tmp_path, num_train_epochs=3,
                                                                    remove_unused_columns=False),
                      train_dataset=rows, callbacks=[PatchEpochCallback(transform), Seen()])
    trainer.train()
    assert seen == [0] * 5 + [1] * 5 + [2] * 5


def test_noise_callback_anneals_and_removes_its_hooks(tmp_path):
    levels = []

    class Level(TrainerCallback):
        def on_step_begin(self, *a, **k):
            levels.append(noise.noise.level)

    model = tiny_models.mlp_classifier()
    site = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    noise = ActivationNoiseCallback(std=0.4, anneal=(2,), factor=1e-5, sites=(site,))
    trainer = Trainer(model=model, args=args(tmp_path, num_train_epochs=3), train_dataset=mlp_dataset(),
                      callbacks=[noise, Level()])
    trainer.train()
    assert levels == pytest.approx([0.4] * 5 + [0.4e-5] * 10)
    assert noise.noise is None  # hooks removed at the end of training
    batch = mlp_dataset()[:4]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch)["logits"], model(**batch)["logits"])
