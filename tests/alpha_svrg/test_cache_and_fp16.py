"""alpha-SVRG's cache mode (the official `Cache_SVRG`) and fp16 loss scaling."""

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from hf_regtools._trainer_utils import rng_state, set_rng_state
from hf_regtools.testing.harness import build_trainer, emulate_fp16_loss_scaling

from .test_alpha_svrg import CorrectedGradientProbe

MIXIN = "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin"
VIT = {"model": "transformers_vit", "callbacks": [], "deterministic": True, "mixin": MIXIN,
       "model_kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
DROPOUT_VIT = dict(VIT, deterministic=False, model_kwargs={"hidden_dropout_prob": 0.2,
                                                           "attention_probs_dropout_prob": 0.2})
SGD = dict(optim="sgd", learning_rate=0.05, max_grad_norm=0.0)


def parameters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cache_mode_equals_snapshot_mode(tmp_path, accumulation):
    """Without dropout, caching the epoch's snapshot gradients changes the cost, not the result: the same mu (over
    the full steps, here with a short last step) and the same per-step gradients, over three epochs of alpha. Bit for
    bit at gradient accumulation 1; under accumulation mu is summed in another order (micro-batch gradients over the
    epoch, against per-step sums of gradients divided by the accumulation): rounding apart (7e-9 in the weights here),
    as are the two official modes."""
    results = {}
    for mode in ("snapshot", "cache"):
        trainer = build_trainer(VIT, tmp_path / mode, max_steps=-1, num_train_epochs=3, dataset_size=36,
                                batch_size=8 // accumulation, gradient_accumulation_steps=accumulation, **SGD,
                                trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.75, "mode": mode}})
        trainer.train()
        results[mode] = parameters(trainer)
    assert trainer._cache == {}, "cached gradients are released once used"
    if accumulation == 1:
        assert all(torch.equal(results["snapshot"][k], results["cache"][k]) for k in results["cache"])
    for key in results["cache"]:
        torch.testing.assert_close(results["snapshot"][key], results["cache"][key], atol=1e-6, rtol=0)


def test_cache_mode_with_gradient_accumulation_matches_the_whole_batch(tmp_path):
    results = {}
    for name, batch, accumulation in (("whole", 8, 1), ("accumulated", 4, 2)):
        trainer = build_trainer(VIT, tmp_path / name, max_steps=-1, num_train_epochs=2, batch_size=batch,
                                gradient_accumulation_steps=accumulation, **SGD,
                                trainer_init_kwargs={"alpha_svrg": {"alpha0": 1.0, "kind": "constant",
                                                                    "mode": "cache"}})
        trainer.train()
        results[name] = parameters(trainer)
    for key in results["whole"]:
        torch.testing.assert_close(results["whole"][key], results["accumulated"][key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pipeline", ["random transform", "unseeded sampler"])
def test_cache_mode_trains_on_the_batches_its_cache_saw(tmp_path, pipeline):
    """The epoch's batches are taken once, so even a pipeline that cannot be replayed (random augmentation from the
    global RNG, a sampler without a seed) pairs each cached gradient with its batch: with alpha = 1 right after the
    refresh the corrected gradient is exactly mu, dropout included."""
    probe = CorrectedGradientProbe()
    trainer = build_trainer(DROPOUT_VIT, tmp_path, max_steps=1, callbacks=[probe], max_grad_norm=0.0,
                            accelerator_config={"use_seedable_sampler": pipeline != "unseeded sampler"},
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 1.0, "kind": "constant", "mode": "cache"}})
    if pipeline == "random transform":
        def augment(batch):
            pixels = torch.tensor(np.array(batch["pixel_values"]), dtype=torch.float32)
            return {"pixel_values": pixels + 0.1 * torch.randn_like(pixels), "labels": torch.tensor(batch["labels"])}

        trainer.train_dataset = trainer.train_dataset.with_format(None).with_transform(augment)
    trainer.train()
    assert probe.checked == len(list(trainer.model.parameters()))


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.trainer, self.parameters, self.skipped = None, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.parameters.append(parameters(self.trainer))

    def on_step_end(self, args, state, control, **kwargs):
        self.parameters.append(parameters(self.trainer))
        self.skipped.append(self.trainer.accelerator.optimizer_step_was_skipped)


@pytest.mark.parametrize("mode", ["snapshot", "cache"])
def test_fp16_overflow_steps_are_skipped_and_snapshot_passes_rescaled(tmp_path, mode):
    """At a loss scale of 2**22 the first steps overflow: the GradScaler skips them (weights, AdamW state untouched),
    halves the scale, and training goes on; the snapshot's full-gradient and per-step passes, which overflow too, are
    repeated at a lower scale instead of feeding inf into the correction."""
    recorder = StepRecorder()
    trainer = build_trainer(VIT, tmp_path, max_steps=8, fp16=True, max_grad_norm=0.0, callbacks=[recorder],
                            trainer_init_kwargs={"alpha_svrg": {"alpha0": 0.75, "mode": mode}})
    recorder.trainer = trainer
    emulate_fp16_loss_scaling(trainer, init_scale=2.0 ** 22)
    trainer.train()
    skipped = recorder.skipped
    assert skipped[0] and not all(skipped), skipped
    for step, was_skipped in enumerate(skipped):
        before, after = recorder.parameters[step], recorder.parameters[step + 1]
        assert all(torch.equal(before[k], after[k]) for k in before) == was_skipped, step
    optimizer = trainer.svrg_optimizer
    first = next(iter(trainer.model.parameters()))
    assert int(optimizer.base.state[first]["step"]) == skipped.count(False)
    assert trainer.accelerator.scaler.get_scale() < 2.0 ** 22
    assert all(torch.isfinite(t).all() for t in [*trainer.model.parameters(), *optimizer.full_gradient])


def test_an_overflowing_snapshot_pass_is_repeated_at_half_the_scale_with_the_same_dropout_masks(tmp_path):
    trainer = build_trainer(DROPOUT_VIT, tmp_path, max_steps=1, fp16=True, max_grad_norm=0.0)
    emulate_fp16_loss_scaling(trainer, init_scale=2.0 ** 8)
    trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))
    calls = []
    snapshot_loss = trainer._snapshot_loss
    trainer._snapshot_loss = lambda *a, **k: (calls.append(1), snapshot_loss(*a, **k))[1]
    start = rng_state()
    trainer._loss_scale = 2.0 ** 40
    repeated = trainer._snapshot_gradient([batch], None, per_update=False)
    assert len(calls) > 1, "2**40 overflows fp16, so the pass is repeated"
    set_rng_state(start)
    trainer._loss_scale, calls[:] = 2.0 ** (40 - (len(calls) - 1)), []  # the scale the repeats ended at
    direct = trainer._snapshot_gradient([batch], None, per_update=False)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(repeated, direct)), "same unscaled gradient, same dropout masks"
