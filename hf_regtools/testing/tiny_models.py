"""Tiny models of every supported family, built from configs (never downloaded), for tests and examples.

`MODELS[(library, family)]` builds a model of every supported family. For the families weight selection supports
(the vision families, ResNets, VGG, Llama-layout decoders, `transformers_llama`, GPT-2, `transformers_gpt2`, and
BERT-style encoders, `transformers_bert` and `transformers_roberta`), `TEACHERS[(library, family)]` builds a teacher
and `STUDENTS[(library, family)]` a narrower, shallower student of the same family. All are small enough to train
for a few steps on CPU in a fraction of a second.

`timm_wrapped_vit`, `timm_convnext_classifier` and `timm_resnet_classifier` are timm models as they reach a `Trainer`:
inside transformers' `TimmWrapperForImageClassification`, and inside a small user module returning `{"loss",
"logits"}`. BatchNorm ResNets (`timm_resnet`, `transformers_resnet`) and a BERT-style text encoder
(`transformers_bert`), a bias-free MLP without normalization (`mlp_classifier`) and a VGG-style BatchNorm CNN
(`vgg_classifier`) serve the techniques that need them; `INPUTS` says what each Trainer-ready builder consumes.
`byte_level_tokenizer` is a small tokenizer for the text models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def timm_vit(*, embed_dim: int = 16, depth: int = 4, num_heads: int = 2, num_classes: int = 3, img_size: int = 16,
             patch_size: int = 4, in_chans: int = 3, distilled: bool = False, **kwargs) -> torch.nn.Module:
    import timm

    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return timm.create_model(name, pretrained=False, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, num_classes=num_classes, in_chans=in_chans, **kwargs)


def timm_convnext(*, dims: tuple[int, ...] = (8, 16, 32, 64), depths: tuple[int, ...] = (2, 2, 3, 2),
                  num_classes: int = 3, v2: bool = False, conv_mlp: bool = False, **kwargs) -> torch.nn.Module:
    import timm

    name = "convnextv2_atto" if v2 else "convnext_tiny"
    extra = {} if v2 else {"conv_mlp": conv_mlp}
    return timm.create_model(name, pretrained=False, dims=dims, depths=depths, num_classes=num_classes, **extra,
                             **kwargs)


def transformers_vit(*, hidden_size: int = 16, num_hidden_layers: int = 4, num_attention_heads: int = 2,
                     intermediate_size: int = 32, image_size: int = 16, patch_size: int = 4, num_channels: int = 3,
                     num_labels: int = 3, deit: bool = False, **kwargs) -> torch.nn.Module:
    from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig,
                              ViTForImageClassification)

    config_class, model_class = (DeiTConfig, DeiTForImageClassificationWithTeacher) if deit else (
        ViTConfig, ViTForImageClassification)
    config = config_class(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                          num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                          image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                          num_labels=num_labels, **kwargs)
    return model_class(config)


def transformers_convnext(*, hidden_sizes: tuple[int, ...] = (8, 16, 32, 64), depths: tuple[int, ...] = (2, 2, 3, 2),
                          num_labels: int = 3, v2: bool = False, **kwargs) -> torch.nn.Module:
    from transformers import (ConvNextConfig, ConvNextForImageClassification, ConvNextV2Config,
                              ConvNextV2ForImageClassification)

    config_class, model_class = (ConvNextV2Config, ConvNextV2ForImageClassification) if v2 else (
        ConvNextConfig, ConvNextForImageClassification)
    return model_class(config_class(hidden_sizes=list(hidden_sizes), depths=list(depths), num_labels=num_labels,
                                    **kwargs))


def timm_swin(*, embed_dim: int = 16, depths: tuple[int, ...] = (2, 2), num_heads: tuple[int, ...] = (1, 2),
              window_size: int = 2, img_size: int = 32, patch_size: int = 4, num_classes: int = 3,
              **kwargs) -> torch.nn.Module:
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=embed_dim, depths=depths,
                             num_heads=num_heads, window_size=window_size, img_size=img_size, patch_size=patch_size,
                             num_classes=num_classes, **kwargs)


def transformers_swin(*, embed_dim: int = 16, depths: tuple[int, ...] = (2, 2), num_heads: tuple[int, ...] = (1, 2),
                      window_size: int = 2, image_size: int = 32, patch_size: int = 4, num_labels: int = 3,
                      **kwargs) -> torch.nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads),
                                                 window_size=window_size, image_size=image_size,
                                                 patch_size=patch_size, num_labels=num_labels, **kwargs))


def timm_wrapped_vit(*, embed_dim: int = 16, depth: int = 4, num_heads: int = 2, num_labels: int = 3,
                     img_size: int = 16, patch_size: int = 4, **model_args) -> torch.nn.Module:
    """A tiny timm ViT in transformers' `TimmWrapperForImageClassification` (timm model at `.timm_model`), built from
    a `TimmWrapperConfig` without downloading anything."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="vit_tiny_patch16_224", num_labels=num_labels,
                               model_args=dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                               depth=depth, num_heads=num_heads, **model_args))
    return TimmWrapperForImageClassification(config)


class TimmClassifier(torch.nn.Module):
    """A user module holding a timm model: `forward(pixel_values, labels=None)` returns `{"loss", "logits"}`, which
    is all the `Trainer` needs."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.backbone(pixel_values)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return outputs


def timm_convnext_classifier(**kwargs) -> TimmClassifier:
    """A tiny timm ConvNeXt (`timm_convnext(**kwargs)`) in a `TimmClassifier` user module."""
    return TimmClassifier(timm_convnext(**kwargs))


def timm_resnet(*, channels: tuple[int, ...] = (8, 16, 32, 64), layers: tuple[int, ...] = (1, 1, 1, 1),
                num_classes: int = 3, bottleneck: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny timm `ResNet` with BatchNorm (basic blocks, or bottlenecks), stem as wide as the first stage."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    return ResNet(Bottleneck if bottleneck else BasicBlock, layers=list(layers), channels=tuple(channels),
                  stem_width=channels[0], num_classes=num_classes, **kwargs)


def timm_vgg(*, widths: tuple[int, ...] = (16, 32, 32), mlp_ratio: float = 1 / 256, num_classes: int = 3,
             batch_norm: bool = True) -> torch.nn.Module:
    """A tiny timm `VGG`: one convolution in the first stage and the rest in the second (a pool after each stage),
    BatchNorm after each convolution, a head MLP `4096 * mlp_ratio` wide."""
    from timm.models.vgg import VGG

    cfg = [widths[0], "M", *widths[1:], "M"]
    return VGG(cfg, num_classes=num_classes, mlp_ratio=mlp_ratio,
               norm_layer=torch.nn.BatchNorm2d if batch_norm else None)


def timm_resnet_model(architecture: str = "resnet18", *, channels: tuple[int, ...] = (8, 16, 32, 64),
                      layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 3, **kwargs) -> torch.nn.Module:
    """A tiny registered timm ResNet (`timm.create_model`, so that it saves with a config timm rebuilds):
    `"resnet18"` (basic blocks), `"resnet50"` (bottlenecks), `"resnet10t"` / `"resnet50d"` (deep stems `2 *
    stem_width` wide, average-pool shortcuts). timm's plain stem is 64 channels wide."""
    import timm

    return timm.create_model(architecture, pretrained=False, channels=channels, layers=layers,
                             num_classes=num_classes, **kwargs)


def timm_resnet_classifier(**kwargs) -> TimmClassifier:
    """A tiny timm ResNet (`timm_resnet(**kwargs)`) in a `TimmClassifier` user module."""
    return TimmClassifier(timm_resnet(**kwargs))


def transformers_resnet(*, hidden_sizes: tuple[int, ...] = (8, 16, 32, 64), depths: tuple[int, ...] = (1, 1, 1, 1),
                        embedding_size: int = 8, layer_type: str = "basic", num_labels: int = 3,
                        **kwargs) -> torch.nn.Module:
    """A tiny transformers `ResNetForImageClassification` (BatchNorm after every convolution)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
                                                     depths=list(depths), layer_type=layer_type, num_labels=num_labels,
                                                     **kwargs))


class MLPClassifier(torch.nn.Module):
    """A plain MLP on flattened images, of bias-free linear layers only (no normalization): every parameter is a
    matrix. `forward(pixel_values, labels=None)` returns `{"loss", "logits"}`."""

    def __init__(self, in_features: int, width: int, depth: int, num_labels: int):
        super().__init__()
        sizes = [in_features, *[width] * (depth - 1), num_labels]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:]))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = pixel_values.flatten(1)
        for layer in self.layers[:-1]:
            hidden = torch.relu(layer(hidden))
        logits = self.layers[-1](hidden)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return outputs


def mlp_classifier(*, image_size: int = 8, channels: int = 3, width: int = 32, depth: int = 3,
                   num_labels: int = 3) -> MLPClassifier:
    """A tiny `MLPClassifier` for `channels` x `image_size` x `image_size` images."""
    return MLPClassifier(channels * image_size * image_size, width, depth, num_labels)


class VGGClassifier(torch.nn.Module):
    """A VGG-style BatchNorm CNN: `features` is an `nn.Sequential` of `Conv2d(3x3, bias=False)`, `BatchNorm2d`, `ReLU`
    (and `MaxPool2d(2)` where `config` says `"M"`), then global average pooling and `classifier`, an `nn.Sequential`
    of `Linear`, `BatchNorm1d`, `ReLU`, `Linear` (the layout of the nested-dropout paper's CIFAR VGG).
    `forward(pixel_values, labels=None)` returns `{"loss", "logits"}`."""

    def __init__(self, config: tuple = (8, "M", 16, "M", 32, 32), hidden: int = 16, num_labels: int = 3,
                 channels: int = 3):
        super().__init__()
        layers, inputs = [], channels
        for item in config:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(2))
                continue
            layers += [torch.nn.Conv2d(inputs, item, 3, padding=1, bias=False), torch.nn.BatchNorm2d(item),
                       torch.nn.ReLU(inplace=True)]
            inputs = item
        self.features = torch.nn.Sequential(*layers)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.classifier = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.BatchNorm1d(hidden),
                                              torch.nn.ReLU(inplace=True), torch.nn.Linear(hidden, num_labels))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.pool(self.features(pixel_values)).flatten(1))
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return outputs


def vgg_classifier(**kwargs) -> VGGClassifier:
    """A tiny `VGGClassifier` for 3 x 16 x 16 images (channels divisible by 4, for nested dropout's groups)."""
    return VGGClassifier(**kwargs)


TEXT_VOCAB_SIZE = 64
TEXT_LENGTH = 12


def transformers_bert(*, hidden_size: int = 16, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                      intermediate_size: int = 32, vocab_size: int = TEXT_VOCAB_SIZE, num_labels: int = 3,
                      **kwargs) -> torch.nn.Module:
    """A tiny BERT-style encoder with a sequence-classification head (`BertForSequenceClassification`)."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                                    num_attention_heads=num_attention_heads,
                                                    intermediate_size=intermediate_size, vocab_size=vocab_size,
                                                    max_position_embeddings=4 * TEXT_LENGTH, num_labels=num_labels,
                                                    **kwargs))


def transformers_roberta(*, hidden_size: int = 16, num_hidden_layers: int = 2, num_attention_heads: int = 2,
                         intermediate_size: int = 32, vocab_size: int = TEXT_VOCAB_SIZE, num_labels: int = 3,
                         **kwargs) -> torch.nn.Module:
    """A tiny RoBERTa encoder with its sequence-classification head (`classifier.dense` + `classifier.out_proj`)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size, vocab_size=vocab_size, max_position_embeddings=4 * TEXT_LENGTH + 2,
        num_labels=num_labels, **kwargs))


def transformers_llama(*, hidden_size: int = 32, num_hidden_layers: int = 4, num_attention_heads: int = 4,
                       num_key_value_heads: int = 2, intermediate_size: int = 48, vocab_size: int = TEXT_VOCAB_SIZE,
                       model_type: str = "llama", **kwargs) -> torch.nn.Module:
    """A tiny decoder of the Llama layout (`model_type` "llama", "mistral", "qwen2" or "qwen3") with grouped-query
    attention, as `*ForCausalLM`."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                                  intermediate_size=intermediate_size, vocab_size=vocab_size,
                                  max_position_embeddings=8 * TEXT_LENGTH, **kwargs)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    return getattr(transformers, f"{name}ForCausalLM")(config)


def transformers_gpt2(*, n_embd: int = 32, n_layer: int = 4, n_head: int = 4, n_inner: int | None = None,
                      vocab_size: int = TEXT_VOCAB_SIZE, classification: bool = False, **kwargs) -> torch.nn.Module:
    """A tiny GPT-2 (`GPT2LMHeadModel`, or `GPT2ForSequenceClassification` with `classification`), its MLP 4 times
    its width unless `n_inner` is given."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=n_inner, vocab_size=vocab_size,
                        n_positions=8 * TEXT_LENGTH, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    return (GPT2ForSequenceClassification if classification else GPT2LMHeadModel)(config)


def byte_level_tokenizer(*, vocab_size: int = 300, unk_token: str = "<unk>", bos_token: str = "<s>",
                         eos_token: str = "</s>"):
    """A byte-level BPE tokenizer (the kind GPT-2 and Llama 3 use) trained on the standard library's `textwrap.py`,
    as a `PreTrainedTokenizerFast` of `vocab_size` tokens (special tokens first)."""
    import sysconfig
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys((unk_token, bos_token,
                                                                                            eos_token))),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([source], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unk_token, bos_token=bos_token,
                                   eos_token=eos_token, model_input_names=["input_ids", "attention_mask"])


INPUTS: dict[str, dict] = {
    "transformers_vit": {"image_size": 16},
    "transformers_convnext": {"image_size": 32},
    "transformers_swin": {"image_size": 32},
    "transformers_resnet": {"image_size": 32},
    "timm_wrapped_vit": {"image_size": 16},
    "timm_convnext_classifier": {"image_size": 32},
    "timm_resnet_classifier": {"image_size": 32},
    "mlp_classifier": {"image_size": 8},
    "vgg_classifier": {"image_size": 16},
    "transformers_bert": {"vocab_size": TEXT_VOCAB_SIZE, "length": TEXT_LENGTH},
}
"""What each Trainer-ready builder takes: `{"image_size"}` (`pixel_values`, 3 channels) or `{"vocab_size", "length"}`
(`input_ids` and `attention_mask`); all take `labels` in `range(3)`."""


TEACHERS: dict[tuple[str, str], Callable[..., torch.nn.Module]] = {
    ("timm", "vit"): timm_vit,
    ("timm", "deit"): lambda **kw: timm_vit(distilled=True, **kw),
    ("timm", "convnext"): timm_convnext,
    ("timm", "convnextv2"): lambda **kw: timm_convnext(v2=True, **kw),
    ("transformers", "vit"): transformers_vit,
    ("transformers", "deit"): lambda **kw: transformers_vit(deit=True, **kw),
    ("transformers", "convnext"): transformers_convnext,
    ("transformers", "convnextv2"): lambda **kw: transformers_convnext(v2=True, **kw),
}
TEACHERS[("transformers", "llama")] = transformers_llama
TEACHERS[("transformers", "gpt2")] = transformers_gpt2
TEACHERS[("transformers", "bert")] = transformers_bert
TEACHERS[("transformers", "roberta")] = transformers_roberta
TEACHERS[("timm", "vgg")] = timm_vgg
TEACHERS[("timm", "resnet")] = timm_resnet_model
TEACHERS[("transformers", "resnet")] = lambda **kw: transformers_resnet(**{"depths": (2, 2, 2, 2), **kw})

_STUDENT_ARGS = {
    "timm": {"vit": dict(embed_dim=8, depth=2, num_heads=1), "convnext": dict(dims=(4, 8, 16, 32), depths=(1, 1, 2, 1)),
             "vgg": dict(widths=(8, 16, 16), mlp_ratio=1 / 512),
             "resnet": dict(channels=(4, 8, 16, 32), layers=(1, 2, 1, 1))},
    "transformers": {"vit": dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16),
                     "convnext": dict(hidden_sizes=(4, 8, 16, 32), depths=(1, 1, 2, 1)),
                     "resnet": dict(hidden_sizes=(4, 8, 16, 32), depths=(1, 2, 1, 1), embedding_size=4),
                     "llama": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=24, head_dim=8),
                     "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_inner=48),
                     **{name: dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16)
                        for name in ("bert", "roberta")}},
}


def _narrower(build: Callable[..., torch.nn.Module], **defaults) -> Callable[..., torch.nn.Module]:
    return lambda **kwargs: build(**{**defaults, **kwargs})


STUDENTS: dict[tuple[str, str], Callable[..., torch.nn.Module]] = {
    (library, family): _narrower(build, **_STUDENT_ARGS[library][
        "convnext" if "convnext" in family else family if family in _STUDENT_ARGS[library] else "vit"])
    for (library, family), build in TEACHERS.items()
}

MODELS: dict[tuple[str, str], Callable[..., torch.nn.Module]] = {
    **TEACHERS,
    ("timm", "swin"): timm_swin,
    ("transformers", "swin"): transformers_swin,
}
