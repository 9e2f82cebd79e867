"""TwoStreamTrainerMixin: batch composition, epoch length, source cycling, the lambda_u = 0 equivalence, head learning
rate, LR decay in a single process, logging, saving, and the FixMatch-style variant."""

import json

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_regtools.data_selection import SourceStream, TwoHeadModel, TwoStreamConfig, TwoStreamTrainerMixin
from hf_regtools.data_selection.two_head import fixmatch_loss
from hf_regtools.schedules import MultiStepLRLambda, multistep_lr_factor
from hf_regtools.testing import tiny_models
from hf_regtools.testing.harness import dataset

CASE = {"model": "transformers_resnet"}


class TwoStreamTrainer(TwoStreamTrainerMixin, Trainer):
    pass


def model(seed=0, builder=tiny_models.transformers_resnet, n_source=5):
    torch.manual_seed(seed)
    return TwoHeadModel(builder(), 3, n_source)


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.05, logging_steps=1,
                    report_to="none", use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0,
                    disable_tqdm=True, max_grad_norm=0.0, optim="sgd", lr_scheduler_type="constant")
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer(tmp_path, two_stream, *, net=None, n_target=22, n_source=13, **overrides):
    two_stream = {"source_dataset": dataset(CASE, n_source, seed=1, num_labels=5), **two_stream}
    return TwoStreamTrainer(model=net if net is not None else model(), args=arguments(tmp_path, **overrides),
                            train_dataset=dataset(CASE, n_target), two_stream=two_stream)


class LearningRates(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


def record_batches(net):
    sizes = []
    net.classifier.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        len(kwargs.get("pixel_values", args[0] if args else None))), with_kwargs=True)
    return sizes


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_each_forward_holds_b_target_and_mu_b_source_examples(mu, tmp_path):
    net = model()
    sizes = record_batches(net)
    run = trainer(tmp_path, {"mu": mu}, net=net, max_steps=3, n_source=40)
    run.train()
    assert sizes == [4 + int(4 * mu)] * 3


@pytest.mark.parametrize("drop_last, steps", [(True, 2 * (22 // 4)), (False, 2 * 6)])
def test_the_target_loader_sets_the_epoch(drop_last, steps, tmp_path):
    run = trainer(tmp_path, {"drop_last": drop_last}, num_train_epochs=2)
    run.train()
    assert run.state.global_step == steps
    # 13 source examples in batches of 4: 3 per cycle, so 10 or 12 steps cycle 3 to 4 times
    assert run.source_stream().position == steps


def test_source_stream_cycles_in_new_orders_and_ranks_read_distinct_shards():
    data = list(range(23))
    stream = SourceStream(data, 5, seed=3)
    assert stream.batches_per_cycle == 4
    batches = [stream.next_batch().tolist() for _ in range(12)]
    cycles = [sum(batches[i:i + 4], []) for i in (0, 4, 8)]
    for cycle, order in zip(cycles, range(3)):
        assert len(set(cycle)) == 20 and cycle == stream.order(order)[:20].tolist()
    assert cycles[0] != cycles[1] != cycles[2]
    resumed = SourceStream(data, 5, seed=3)
    resumed.load_state_dict({**stream.state_dict(), "position": 6})
    assert [resumed.next_batch().tolist() for _ in range(6)] == batches[6:]

    shards = [SourceStream(data, 5, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    first = [sum((s.next_batch().tolist() for _ in range(s.batches_per_cycle)), []) for s in shards]
    assert shards[0].batches_per_cycle == 2 and not set(first[0]) & set(first[1])
    with pytest.raises(ValueError, match="fewer than one source batch"):
        SourceStream(list(range(7)), 4, world_size=2)
    with pytest.raises(ValueError, match="same per-device batch size"):
        resumed.load_state_dict({"position": 1, "batch_size": 4})


def freeze_batchnorm(net):
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train = lambda mode=True, module=module: torch.nn.Module.train(module, False)
            module.eval()
    return net


def vanilla(tmp_path, net, steps):
    plain = Trainer(model=net, args=arguments(tmp_path / "vanilla", max_steps=steps, dataloader_drop_last=True),
                    train_dataset=dataset(CASE, 22))
    plain.train()
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def parameters(run):
    return {name: p.detach().clone() for name, p in run.model.named_parameters()}


@pytest.mark.parametrize("variant", ["mu=0", "bn_eval"])
def test_lambda_zero_equals_vanilla_fine_tuning_with_mu_zero_or_bn_in_eval(variant, tmp_path):
    prepare = freeze_batchnorm if variant == "bn_eval" else (lambda net: net)
    two_stream = {"lambda_u": 0.0, "head_lr_mult": 1.0, "mu": 0.0 if variant == "mu=0" else 1.0}
    run = trainer(tmp_path / "two", two_stream, net=prepare(model()), max_steps=4)
    run.train()
    expected = vanilla(tmp_path, prepare(model()), 4)
    got = parameters(run)
    for name, value in expected.items():
        if not name.startswith("source_head"):
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)


def test_lambda_zero_alone_is_not_vanilla_fine_tuning(tmp_path):
    # the source images still shape the BatchNorm batch statistics (spec §7.5)
    run = trainer(tmp_path / "two", {"lambda_u": 0.0, "head_lr_mult": 1.0, "mu": 1.0}, max_steps=4)
    run.train()
    expected, got = vanilla(tmp_path, model(), 4), parameters(run)
    assert any(not torch.allclose(got[name], value, atol=1e-4) for name, value in expected.items())


def test_heads_get_the_learning_rate_multiplier(tmp_path):
    run = trainer(tmp_path, {"head_lr_mult": 10.0}, max_steps=1, weight_decay=1e-4)
    run.create_optimizer()
    groups = run.optimizer.param_groups
    heads = {id(p) for p in run.model.head_parameters()}
    for group in groups:
        in_heads = {id(p) in heads for p in group["params"]}
        assert len(in_heads) == 1
        assert group["lr"] == pytest.approx(0.5 if in_heads.pop() else 0.05) and group.get("head", False) == (
            group["lr"] > 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(run.model.parameters()))
    assert {g["weight_decay"] for g in groups if g.get("head")} == {0.0, 1e-4}  # decay and no-decay groups kept


def test_multistep_schedule_is_a_pure_function_of_the_epoch():
    assert [multistep_lr_factor(e) for e in (0, 59, 59.99, 60, 79, 80, 99)] == pytest.approx(
        [1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    schedule = MultiStepLRLambda(7, [60, 80])
    assert [schedule(s) for s in (7 * 60 - 1, 7 * 60, 7 * 80 - 1, 7 * 80)] == pytest.approx([1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="increasing order"):
        multistep_lr_factor(0, milestones=(80, 60))


def test_learning_rate_decays_at_the_milestone_epochs_in_a_single_process(tmp_path):
    # the official adjust_learning_rate never decays single-process (spec §4); 8 examples in batches of 4 = 2 steps
    record = LearningRates()
    run = trainer(tmp_path, {"lr_milestones": [2, 3]}, n_target=8, num_train_epochs=5)
    run.add_callback(record)
    run.train()
    assert run.args.world_size == 1 and run.state.global_step == 10
    backbone = [lrs[0] for lrs in record.lrs]
    assert backbone == pytest.approx([0.05] * 4 + [0.005] * 2 + [0.0005] * 4)
    assert [max(lrs) for lrs in record.lrs] == pytest.approx([10 * lr for lr in backbone])


def test_both_losses_are_logged_and_the_loss_combines_them(tmp_path):
    run = trainer(tmp_path, {"lambda_u": 0.3}, max_steps=3)
    run.train()
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        target, source = entry["hf_regtools/data_selection/loss_target"], entry["hf_regtools/data_selection/loss_source"]
        assert entry["loss"] == pytest.approx(target + 0.3 * source, rel=1e-4)


VIT = {"model": "transformers_vit"}


def vit_trainer(tmp_path, *, batch, accumulation, n_source=20):
    torch.manual_seed(0)
    net = TwoHeadModel(tiny_models.transformers_vit(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 3, 5)
    return TwoStreamTrainer(model=net, args=arguments(tmp_path, max_steps=3, per_device_train_batch_size=batch,
                                                      gradient_accumulation_steps=accumulation),
                            train_dataset=dataset(VIT, 32), two_stream={
                                "source_dataset": dataset(VIT, n_source, seed=1, num_labels=5), "mu": 1.0})


@pytest.mark.parametrize("n_source", [20, 32])
def test_gradient_accumulation_equals_the_whole_batch(n_source, tmp_path):
    # no BatchNorm, no dropout: batch 8 (8 source) and 4 x 2 micro-batches (the same 8 source examples, 4 each) give
    # the same updates; 20 source examples cycle after 2 steps of 8, not after 5 micro-batches of 4
    whole = vit_trainer(tmp_path / "whole", batch=8, accumulation=1, n_source=n_source)
    whole.train()
    accumulated = vit_trainer(tmp_path / "accumulated", batch=4, accumulation=2, n_source=n_source)
    accumulated.train()
    start = vit_trainer(tmp_path / "start", batch=8, accumulation=1).model
    a, b = parameters(whole), parameters(accumulated)
    assert all(not torch.equal(a[name], p) for name, p in start.named_parameters() if name.startswith("source_head"))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-6, rtol=0, msg=name)
    assert whole.source_stream().position == accumulated.source_stream().position == 3


@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_saved_model_loads_as_an_ordinary_classifier_with_the_same_target_logits(library, tmp_path):
    builder = tiny_models.transformers_resnet if library == "transformers" else (
        lambda: tiny_models.TimmClassifier(tiny_models.timm_convnext(depths=(1, 1, 1, 1))))
    selection = {"source": "org/source", "class_ids": [4, 1], "weights": [1.2, 0.4], "num_examples": 13}
    run = trainer(tmp_path / "run", {"selection": selection, "base_model": "org/pretrained"},
                  net=model(builder=builder), max_steps=2)
    run.train()
    run.save_model()
    run.create_model_card()
    out = tmp_path / "run"
    x = torch.randn(3, 3, 32, 32)
    net = run.model.eval()
    if library == "transformers":
        from transformers import AutoModelForImageClassification

        loaded = AutoModelForImageClassification.from_pretrained(out).eval()
        logits = loaded(pixel_values=x).logits
    else:
        import timm

        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        logits = loaded(x)
    torch.testing.assert_close(logits, net(x)["logits"])
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/pretrained" and {"data-selection", "hf-regtools"} <= set(card.data.tags)
    assert "| 1 | 4 |  | 1.2 |" in card.text and "TwoStreamTrainerMixin" in card.text


def test_fixmatch_variant_loss_against_a_hand_computation(tmp_path):
    flip = lambda image: image.flip(-1)  # noqa: E731  a deterministic "strong" view
    net = tiny_models.transformers_resnet()
    run = TwoStreamTrainer(model=net, args=arguments(tmp_path, max_steps=1), train_dataset=dataset(CASE, 8),
                           two_stream={"source_dataset": dataset(CASE, 12, seed=1), "fixmatch": True,
                                       "lambda_u": 1.0, "threshold": 0.5, "temperature": 0.7,
                                       "strong_transform": flip})
    target = dataset(CASE, 8)[:4]
    run.get_train_dataloader()
    source_rows = [dataset(CASE, 12, seed=1)[int(i)] for i in run.source_stream().order(0)[:4]]
    net.train()
    torch.manual_seed(5)
    loss = run.compute_loss(net, target)
    weak = torch.stack([row["pixel_values"] for row in source_rows])
    torch.manual_seed(5)
    logits = net(pixel_values=torch.cat([target["pixel_values"], weak, weak.flip(-1)])).logits
    net_copy_logits = logits.split([4, 4, 4])
    probabilities = torch.softmax(net_copy_logits[1].detach() / 0.7, -1)
    mask = (probabilities.max(-1).values >= 0.5).float()
    per_sample = -(probabilities * torch.log_softmax(net_copy_logits[2], -1)).sum(-1)
    expected = torch.nn.functional.cross_entropy(net_copy_logits[0], target["labels"]) + \
        (per_sample * mask).sum() / mask.sum().clamp(min=1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fixmatch_loss(net_copy_logits[2], net_copy_logits[1], threshold=0.5,
                                             temperature=0.7)[0], (per_sample * mask).sum() / mask.sum().clamp(min=1))


def test_fixmatch_variant_trains_a_plain_classifier(tmp_path):
    net = tiny_models.transformers_resnet()
    run = TwoStreamTrainer(model=net, args=arguments(tmp_path, max_steps=2), train_dataset=dataset(CASE, 8),
                           two_stream={"source_dataset": dataset(CASE, 12, seed=1), "fixmatch": True,
                                       "lambda_u": 1.0})
    run.train()
    logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert all(entry["hf_regtools/data_selection/mask_rate"] == 1.0 for entry in logs)  # threshold 0: every sample
    assert run.state.global_step == 2


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="needs source_dataset"):
        TwoStreamConfig(mu=1.0)
    with pytest.raises(ValueError, match="unknown settings"):
        TwoStreamConfig.from_value({"lambda": 0.3, "mu": 0})
    with pytest.raises(ValueError, match="takes no source_pixel_values: wrap the classifier"):
        trainer(tmp_path, {}, net=tiny_models.transformers_resnet())
    with pytest.raises(ValueError, match="needs two_stream="):
        TwoStreamTrainer(model=model(), args=arguments(tmp_path), train_dataset=dataset(CASE, 8))


def test_checkpoints_hold_the_source_position(tmp_path):
    run = trainer(tmp_path, {}, max_steps=4, save_strategy="steps", save_steps=2)
    run.train()
    state = json.loads((tmp_path / "checkpoint-2" / "data_selection_state.json").read_text())
    assert state["source_stream"]["position"] == 2 and state["settings"]["lambda_u"] == 0.3
