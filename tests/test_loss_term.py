"""`LossTermTrainerMixin` / `add_per_update_term`: a term of the parameters counts once per optimizer step, in fp32."""

import pytest
import torch

from hf_regtools.testing.harness import build_trainer
from hf_regtools.trainer import LossTermTrainerMixin

COEFFICIENT = 0.05


class SquaredNormTrainer(LossTermTrainerMixin):
    """Adds COEFFICIENT * sum ||W||^2 and records what it saw."""

    seen: list

    def loss_term(self, model):
        self.seen = getattr(self, "seen", []) + [torch.is_autocast_enabled("cpu")]
        term = COEFFICIENT * sum(p.float().pow(2).sum() for p in model.parameters())
        return term, {"hf_regtools/test/term": term.item()}


MIXIN = f"{__name__}:SquaredNormTrainer"
PLAIN = "hf_regtools.trainer:RegtoolsTrainerMixin"
MLP = {"model": "mlp_classifier", "callbacks": [], "deterministic": True, "mixin": MIXIN}
# BERT's forward takes loss kwargs, so under transformers 5 the Trainer leaves its micro-batch losses undivided (and,
# as BERT's loss ignores `num_items_in_batch`, its accumulated gradient is not the whole batch's); without dropout it
# is deterministic
BERT = {"model": "transformers_bert", "callbacks": [], "deterministic": True, "mixin": MIXIN,
        "model_kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        "optimizer": ("torch.optim:SGD", {"lr": 0.05})}


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(case, path, **args):
    trainer = build_trainer(case, path, max_steps=3, learning_rate=0.05, **args)
    trainer.train()
    return trainer


def test_accumulated_micro_batches_equal_the_whole_batch(tmp_path):
    whole = train(MLP, tmp_path / "whole", per_device_train_batch_size=8)
    accumulated = train(MLP, tmp_path / "accumulated", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    for name, value in parameters(whole.model).items():
        torch.testing.assert_close(parameters(accumulated.model)[name], value, atol=1e-6, rtol=1e-5)


def test_the_term_counts_once_per_step_when_the_trainer_does_not_divide_the_loss(tmp_path):
    # one SGD step without clipping: the term's share of the update is -lr * grad(term) whatever the accumulation
    def term_share(**args):
        runs = [build_trainer({**BERT, "mixin": mixin}, tmp_path / f"{mixin}{len(args)}", max_steps=1,
                              max_grad_norm=0.0, **args) for mixin in (MIXIN, PLAIN)]
        for run in runs:
            run.train()
        regularized, plain = (parameters(run.model) for run in runs)
        return {name: regularized[name] - plain[name] for name in plain}

    whole = term_share(per_device_train_batch_size=8)
    accumulated = term_share(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-4)


def test_the_term_changes_training_and_is_logged(tmp_path):
    plain = train({**MLP, "mixin": PLAIN}, tmp_path / "plain")
    regularized = train(MLP, tmp_path / "regularized")
    assert any(not torch.equal(a, b) for a, b in zip(parameters(plain.model).values(),
                                                      parameters(regularized.model).values()))
    logged = [entry["hf_regtools/test/term"] for entry in regularized.state.log_history if "loss" in entry]
    assert len(logged) == 3 and logged[-1] < logged[0]


def test_the_term_is_computed_outside_autocast_and_left_out_of_the_eval_loss(tmp_path):
    trainer = train(MLP, tmp_path / "bf16", bf16=True)
    assert trainer.seen and not any(trainer.seen)
    calls = len(trainer.seen)
    trainer.evaluate(trainer.train_dataset)
    assert len(trainer.seen) == calls
