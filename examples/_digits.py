"""Data and models shared by the training examples: scikit-learn's digits and small image classifiers for them.

The digits (1,797 8x8 grayscale images, 10 classes) ship with scikit-learn, so the examples run offline.
"""

from __future__ import annotations

import torch

from hf_regtools.testing.digits import accuracy, digits_dataset, resized

MODELS = ("transformers-vit", "transformers-convnext", "timm-vit", "timm-convnext")
MODEL_HELP = (f"one of {MODELS} (small models for the 8x8 digits, built from a config), or the Hub id or folder of "
              "an image classifier (AutoModelForImageClassification: transformers models, and timm models through "
              "TimmWrapperForImageClassification; the digits are resized to its input size)")
_TIMM_MODELS = {
    "timm-vit": ("vit_tiny_patch16_224", dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2)),
    "timm-convnext": ("convnext_atto", dict(patch_size=1, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1))),
}


class DigitsMLP(torch.nn.Module):
    """An MLP on the flattened 8x8 digits, `hidden` layers of `width` with `activation` (ReLU by default):
    `forward(pixel_values, labels=None)` returns `{"loss", "logits"}`."""

    def __init__(self, width: int = 256, num_labels: int = 10, *, hidden: int = 2,
                 activation: type[torch.nn.Module] = torch.nn.ReLU):
        super().__init__()
        layers, inputs = [torch.nn.Flatten()], 64
        for _ in range(hidden):
            layers += [torch.nn.Linear(inputs, width), activation()]
            inputs = width
        self.layers = torch.nn.Sequential(*layers, torch.nn.Linear(inputs, num_labels))

    def forward(self, pixel_values, labels=None):
        logits = self.layers(pixel_values)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return outputs


def build_model(name: str, num_labels: int = 10) -> tuple[torch.nn.Module, int, int]:
    """The model named `name` (see `MODELS`) or loaded from a Hub id / folder, its image size and channel count."""
    from transformers import (AutoModelForImageClassification, ConvNextConfig, ConvNextForImageClassification,
                              TimmWrapperConfig, TimmWrapperForImageClassification, ViTConfig,
                              ViTForImageClassification)

    if name == "transformers-vit":
        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
        return ViTForImageClassification(config), 8, 1
    if name == "transformers-convnext":
        config = ConvNextConfig(num_channels=1, patch_size=2, num_stages=3, hidden_sizes=[16, 32, 64],
                                depths=[2, 2, 2], num_labels=num_labels)
        return ConvNextForImageClassification(config), 8, 1
    if name in _TIMM_MODELS:
        architecture, model_args = _TIMM_MODELS[name]
        config = TimmWrapperConfig(architecture=architecture, num_labels=num_labels,
                                   model_args={**model_args, "in_chans": 1})
        return TimmWrapperForImageClassification(config), 8, 1
    model = AutoModelForImageClassification.from_pretrained(name, num_labels=num_labels, ignore_mismatched_sizes=True)
    config = model.config
    if config.model_type == "timm_wrapper":
        channels, size, _ = config.pretrained_cfg["input_size"]
    else:
        size, channels = config.image_size, config.num_channels
    return model, size if isinstance(size, int) else size[0], channels


def digits(split: str, *, image_size: int = 8, channels: int = 1, limit: int | None = None):
    """The `"train"` or `"test"` split of the digits (its first `limit` images), at the model's input size."""
    dataset = digits_dataset(split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if (image_size, channels) == (8, 1):
        return dataset
    return resized(dataset, image_size, channels)


def trainer_defaults(output_dir: str) -> dict:
    """`TrainingArguments` defaults of the examples (each overridable on the command line)."""
    return dict(output_dir=output_dir, num_train_epochs=20, per_device_train_batch_size=64,
                per_device_eval_batch_size=256, learning_rate=1e-3, weight_decay=0.05, lr_scheduler_type="cosine",
                max_grad_norm=0.0, logging_steps=10, save_strategy="no", report_to="none",
                use_cpu=not torch.cuda.is_available())


def train_and_evaluate(trainer, training_args, **card_kwargs) -> None:
    """Train (resuming if asked), save the model, the metrics and the state; push to the Hub if asked."""
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset="scikit-learn digits", tasks="image-classification", **card_kwargs)
