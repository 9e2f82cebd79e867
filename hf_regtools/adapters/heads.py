"""Classifier heads and the pooled features they read, for timm and transformers models in the usual wrappers.

The feature of a classifier is what its final linear layer receives: the pooled (pre-logits) output of the backbone.
`find_classifier_head` locates that layer (timm: `get_classifier()`; transformers: `classifier`, or the linear layer
at the end of a `classifier` `nn.Sequential`, as in `ResNetForImageClassification`), and `pooled_features` runs the
model with it replaced by `nn.Identity`, so the features are exactly the head's input, whatever the family does before
it (CLS token, average pooling, a final norm, a pooler). A backbone without a head (transformers `AutoModel`, timm with
`num_classes=0`) gives its pooled output: `pooler_output`, else the first token of `last_hidden_state`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import UnsupportedModelError, _library_of_class, describe_model

_TRANSFORMERS_HEAD_NAMES = ("classifier", "head", "fc")


@dataclass(frozen=True)
class ClassifierHead:
    """The final linear layer of a classifier.

    Attributes:
        owner (`nn.Module`): the module holding it as the attribute (or `nn.Sequential` index) `name`.
        name (`str`): that attribute, e.g. `"classifier"`, `"fc"`, `"1"`.
        qualified_name (`str`): its name in the outer model, e.g. `"timm_model.head.fc"`, `"classifier.1"`.
        linear (`nn.Linear`): the layer.
    """

    owner: nn.Module
    name: str
    qualified_name: str
    linear: nn.Linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def replace(self, module: nn.Module) -> nn.Module:
        """Put `module` in the head's place; returns the module that was there."""
        previous = getattr(self.owner, self.name)
        setattr(self.owner, self.name, module)
        return previous


def library_model(model: nn.Module) -> tuple[str, nn.Module]:
    """`(prefix, module)`: the shallowest timm model inside `model`, else the shallowest transformers model (`("",
    model)` if it is one). The timm model inside transformers' `TimmWrapperForImageClassification` wins.

    Raises:
        `UnsupportedModelError`: `model` holds no timm or transformers model.
    """
    modules = sorted(model.named_modules(), key=lambda item: item[0].count(".") + bool(item[0]))
    for library, required in (("timm", "get_classifier"), ("transformers", "config")):
        for prefix, module in modules:
            if _library_of_class(module) == library and hasattr(module, required):
                return prefix, module
    raise UnsupportedModelError(f"{describe_model(model)} holds no timm or transformers model; pass a timm model, a "
                                "transformers model, or a module holding one as an attribute")


def find_classifier_head(model: nn.Module) -> ClassifierHead | None:
    """The final linear classifier layer of the timm or transformers model inside `model`; `None` for a backbone
    without a head (transformers `AutoModel`, timm with `num_classes=0`).

    Raises:
        `UnsupportedModelError`: `model` holds no timm or transformers model, or its head is not a linear layer.
    """
    prefix, inner = library_model(model)
    if _library_of_class(inner) == "timm":
        head = inner.get_classifier()
        if isinstance(head, nn.Identity):
            return None
        qualified = next((name for name, module in inner.named_modules() if module is head), None)
    else:
        qualified = next((name for name in _TRANSFORMERS_HEAD_NAMES if isinstance(getattr(inner, name, None), nn.Module)),
                         None)
        head = getattr(inner, qualified) if qualified else None
        if qualified is None or isinstance(head, nn.Identity):
            return None
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        qualified, head = f"{qualified}.{len(head) - 1}", head[-1]
    if not isinstance(head, nn.Linear) or qualified is None:
        raise UnsupportedModelError(f"the classifier head of {describe_model(model)} is a {type(head).__name__}, not "
                                    "a linear layer; pass a model whose head is an nn.Linear (or an nn.Sequential "
                                    "ending in one)")
    owner_name, _, name = qualified.rpartition(".")
    owner = inner.get_submodule(owner_name) if owner_name else inner
    return ClassifierHead(owner, name, f"{prefix}.{qualified}" if prefix else qualified, head)


def feature_dim(model: nn.Module) -> int:
    """Width of `pooled_features(model, ...)`: the head's input width, else the backbone's pooled width."""
    head = find_classifier_head(model)
    if head is not None:
        return head.in_features
    _, inner = library_model(model)
    if _library_of_class(inner) == "timm":
        return int(inner.num_features)
    config = inner.config
    for key in ("hidden_size", "hidden_sizes", "num_features", "dim"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value[-1] if isinstance(value, (list, tuple)) else value)
    raise UnsupportedModelError(f"cannot tell the feature width of {describe_model(model)}; its config has none of "
                                "hidden_size, hidden_sizes, num_features")


@contextmanager
def head_replaced(model: nn.Module, module: nn.Module) -> Iterator[ClassifierHead | None]:
    """Within the block, `module` stands in for the classifier head of `model` (nothing changes without a head)."""
    head = find_classifier_head(model)
    if head is None:
        yield None
        return
    previous = head.replace(module)
    try:
        yield head
    finally:
        head.replace(previous)


def pooled_features(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The `(batch, feature_dim(model))` features the classifier head of `model` reads, for `inputs` (a tensor of
    pixel values, or the keyword inputs of the model); the model's mode (train/eval) is left as it is."""
    with head_replaced(model, nn.Identity()) as head:
        output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return _features_of(output, has_head=head is not None, model=model)


def _features_of(output, *, has_head: bool, model: nn.Module) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        features = output
    elif has_head:
        features = output["logits"] if isinstance(output, Mapping) else output.logits
    else:
        pooled = getattr(output, "pooler_output", None)
        if pooled is None and isinstance(output, Mapping):
            pooled = output.get("pooler_output")
        hidden = getattr(output, "last_hidden_state", None)
        features = pooled if pooled is not None else hidden[:, 0] if hidden is not None and hidden.dim() == 3 else \
            hidden.mean(dim=tuple(range(2, hidden.dim()))) if hidden is not None else None
        if features is None:
            raise UnsupportedModelError(f"{describe_model(model)} returns {type(output).__name__} without logits, "
                                        "pooler_output or last_hidden_state; pass a classifier or a backbone that "
                                        "returns one of them")
    return features.flatten(1) if features.dim() > 2 else features
