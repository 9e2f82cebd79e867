"""The papers' weight-decay grouping (`hf_regtools.optim`), checked against the official rule.

`facebookresearch/dropout` and `davidyyd/alpha-SVRG`, `optim_factory.py::get_parameter_groups`: a parameter gets no
weight decay when `len(param.shape) == 1 or name.endswith(".bias") or name in skip_list`, with
`skip_list = model.no_weight_decay()`. `official_no_decay` below is that rule with the skip list written out per model.
"""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_regtools.optim import (PaperWeightDecayMixin, decay_parameter_names, no_weight_decay_names,
                               param_groups_weight_decay)
from hf_regtools.testing.harness import dataset
from hf_regtools.testing.tiny_models import (timm_convnext, timm_convnext_classifier, timm_swin, timm_vit,
                                             timm_wrapped_vit, transformers_convnext, transformers_swin,
                                             transformers_vit)
from hf_regtools.trainer import RegtoolsTrainerMixin


def official_no_decay(model, skip_list=()):
    return {name for name, p in model.named_parameters() if len(p.shape) == 1 or name.endswith(".bias")
            or name in skip_list}


def timm_resnet():
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=3)


MODELS = {
    "timm vit": (lambda: timm_vit(depth=2), {"cls_token", "pos_embed"}),
    "timm vit in TimmWrapperForImageClassification": (lambda: timm_wrapped_vit(depth=2),
                                                      {"timm_model.cls_token", "timm_model.pos_embed"}),
    "timm convnext": (timm_convnext, set()),
    "timm convnext in a user module": (timm_convnext_classifier, set()),
    "transformers vit": (lambda: transformers_vit(num_hidden_layers=2),
                         {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}),
    "transformers deit": (lambda: transformers_vit(num_hidden_layers=2, deit=True),
                          {"deit.embeddings.cls_token", "deit.embeddings.position_embeddings",
                           "deit.embeddings.distillation_token"}),
    "transformers convnext": (transformers_convnext, set()),
    "timm resnet (batch norm)": (timm_resnet, set()),
    "timm swin": (timm_swin, "relative_position_bias_table"),
    "transformers swin": (transformers_swin, "relative_position_bias_table"),
}


@pytest.mark.parametrize("build, skip_list", MODELS.values(), ids=list(MODELS))
def test_groups_follow_the_official_rule(build, skip_list):
    model = build()
    if isinstance(skip_list, str):  # the official Swin's no_weight_decay(): every name containing it
        skip_list = {name for name, _ in model.named_parameters() if skip_list in name}
        assert skip_list
    names = {id(p): name for name, p in model.named_parameters()}
    groups = param_groups_weight_decay(model, 0.05)
    no_decay = {names[id(p)] for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}
    decay = {names[id(p)] for group in groups if group["weight_decay"] == 0.05 for p in group["params"]}
    assert no_decay == official_no_decay(model, skip_list) and decay == set(names.values()) - no_decay
    assert set(decay_parameter_names(model)) == decay
    assert skip_list <= no_weight_decay_names(model)


def test_the_trainer_default_decays_what_the_papers_do_not():
    expected = {
        "timm vit": {"cls_token", "pos_embed"},
        "timm convnext": {"stages.0.blocks.0.gamma"},
        "transformers vit": {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"},
        "transformers convnext": {"convnext.encoder.stages.0.layers.0.layer_scale_parameter"},
        "timm resnet (batch norm)": {"bn1.weight", "layer1.0.bn1.weight"},
    }
    for label, names in expected.items():
        model = MODELS[label][0]()
        trainer_decays = set(Trainer.get_decay_parameter_names(None, model))
        assert names <= trainer_decays, label
        assert not names & set(decay_parameter_names(model)), label


class PaperTrainer(PaperWeightDecayMixin, RegtoolsTrainerMixin, Trainer):
    pass


def _groups_by_name(trainer):
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    return {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in trainer.optimizer.param_groups}


@pytest.mark.parametrize("model_name", ["timm_wrapped_vit", "transformers_convnext"])
def test_trainer_optimizer_groups_match(model_name, tmp_path):
    from hf_regtools.testing import tiny_models

    def trainer(trainer_class, kwargs):
        torch.manual_seed(0)
        model = getattr(tiny_models, model_name)()
        args = TrainingArguments(str(tmp_path), weight_decay=0.05, report_to="none", use_cpu=True)
        built = trainer_class(model, args, train_dataset=dataset({"model": model_name}), **kwargs(model))
        built.create_optimizer()
        return built, model

    mixin, model = trainer(PaperTrainer, lambda model: {})
    names = {id(p): name for name, p in model.named_parameters()}
    expected = {group["weight_decay"]: {names[id(p)] for p in group["params"]}
                for group in param_groups_weight_decay(model, 0.05)}
    assert _groups_by_name(mixin) == expected
    routed, _ = trainer(Trainer, lambda model: {"optimizer_cls_and_kwargs": (
        torch.optim.AdamW, {"params": param_groups_weight_decay(model, 0.05), "lr": 1e-3})})
    assert _groups_by_name(routed) == expected
    plain, _ = trainer(Trainer, lambda model: {})
    assert _groups_by_name(plain) != expected
