"""Small image datasets from scikit-learn digits and tiny backbones for the prototype, selection and CLI tests."""

from __future__ import annotations

import numpy as np
import torch

TARGET_NAMES = ["zero", "one", "two"]
SOURCE_NAMES = [f"digit{d}" for d in range(6)]


def digit_images(digits, per_class: int, offset: int = 0):
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = [], []
    for label, digit in enumerate(digits):
        for position in np.flatnonzero(data.target == digit)[offset:offset + per_class]:
            images.append(Image.fromarray((data.images[position] * 15).astype("uint8"), mode="L"))
            labels.append(label)
    return images, labels


def image_dataset(digits, names, per_class: int, offset: int = 0):
    """A map-style `Dataset` of `Image` and `ClassLabel` columns (and an unused text column)."""
    import datasets

    images, labels = digit_images(digits, per_class, offset)
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(names)),
                                 note=datasets.Value("string"))
    return datasets.Dataset.from_dict({"image": images, "label": labels, "note": ["x"] * len(labels)},
                                      features=features)


def target_dataset():
    return image_dataset(range(3), TARGET_NAMES, 6)


def source_dataset():
    return image_dataset(range(6), SOURCE_NAMES, 5, offset=20)


def streaming(dataset, folder):
    """`dataset` as a streaming `IterableDataset` over a parquet file (the same rows)."""
    import datasets

    path = str(folder / "data.parquet")
    dataset.to_parquet(path)
    return datasets.load_dataset("parquet", data_files={"train": path}, split="train", streaming=True)


def timm_backbone(seed: int = 0, **kwargs):
    """A tiny timm ResNet-18 layout (one block per stage, widths 8-64) with a 16x16 data config and a 5-class head."""
    import timm

    torch.manual_seed(seed)
    options = dict(layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, num_classes=5,
                   pretrained_cfg_overlay=dict(input_size=(3, 16, 16), crop_pct=1.0))
    return timm.create_model("resnet18", pretrained=False, **{**options, **kwargs}).eval()


def transformers_backbone_folder(folder, seed: int = 0):
    """A tiny transformers ViT (16x16, 3 labels) saved with `save_pretrained`, with its image processor."""
    from transformers import ViTImageProcessor

    from hf_regtools.testing.tiny_models import transformers_vit

    torch.manual_seed(seed)
    model = transformers_vit(num_hidden_layers=2, num_labels=3)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return model.eval()


def manual_prototypes(model, pixels: torch.Tensor, labels: list[int]) -> dict[int, torch.Tensor]:
    """Per-label mean of `pooled_features`, in float64, computed independently of `class_prototypes`."""
    from hf_regtools.adapters.heads import pooled_features

    with torch.no_grad():
        features = pooled_features(model.eval(), pixels).double()
    labels = torch.tensor(labels)
    return {int(value): features[labels == value].mean(0) for value in labels.unique()}


def timm_pixels(model, images) -> torch.Tensor:
    """The timm eval transform of `model`'s data config on RGB copies of `images`."""
    import timm.data

    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    return torch.stack([transform(image.convert("RGB")) for image in images])
