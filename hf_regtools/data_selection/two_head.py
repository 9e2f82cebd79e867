"""The two-head model of the paper's fine-tuning (`build/builder.py` of the official code) and its losses.

A shared backbone feeds a target head (`fc_down`, the target classes) and a source head (`fc_up`, the source classes of
the selected pre-training data). `TwoHeadModel` builds it around any timm or transformers image classifier or backbone:
the target head takes the place of the classifier's own head (so the classifier with its new head *is* the target
model, saved as an ordinary classifier), and the source head reads the same pooled features, captured at the target
head's input. Target and source images go through the backbone in one forward, so BatchNorm statistics are those of
the mixed batch, as in the official code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..adapters import UnsupportedModelError, _library_of_class, describe_model
from ..adapters.heads import find_classifier_head, library_model

OFFICIAL_HEAD_INIT_STD = (2 / 2048) ** 0.5
CARD_START, CARD_END = "<!-- hf_regtools:data_selection:start -->", "<!-- hf_regtools:data_selection:end -->"


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, a mapping with `"logits"`, or a transformers `ModelOutput`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    return output.logits


def _init_head_(linear: nn.Linear, std: float) -> nn.Linear:
    with torch.no_grad():
        linear.weight.normal_(0.0, std)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def _as_classifier(backbone: nn.Module, n_target: int) -> nn.Module:
    """`backbone` with a classifier head of `n_target` outputs (a fresh linear layer in the head's place)."""
    prefix, inner = library_model(backbone)
    head = find_classifier_head(backbone)
    if _library_of_class(inner) == "timm":
        inner.reset_classifier(n_target)
    elif head is not None:
        head.replace(nn.Linear(head.in_features, n_target, device=head.linear.weight.device,
                               dtype=head.linear.weight.dtype))
    elif prefix == "":
        backbone = _transformers_classifier_around(backbone, n_target)
    else:
        raise UnsupportedModelError(f"{describe_model(backbone)} holds a transformers backbone without a classifier "
                                    "head inside another module; pass the backbone itself or a classifier")
    _set_transformers_labels(backbone, n_target)
    return backbone


def _transformers_classifier_around(backbone: nn.Module, n_target: int) -> nn.Module:
    """The `AutoModelForImageClassification` of a transformers backbone's config, holding `backbone` itself."""
    import copy

    from transformers import AutoModelForImageClassification

    config = copy.deepcopy(backbone.config)
    config.num_labels = n_target
    try:
        classifier = AutoModelForImageClassification.from_config(config)
    except ValueError as error:
        raise UnsupportedModelError(f"{describe_model(backbone)} has no image-classification class in transformers "
                                    f"to save the target model as; pass a classifier instead ({error})") from None
    prefix = classifier.base_model_prefix
    if not isinstance(getattr(classifier, prefix, None), type(backbone)):
        raise UnsupportedModelError(f"{type(classifier).__name__}.{prefix} is not a {type(backbone).__name__}; pass "
                                    "the classifier model instead of its backbone")
    setattr(classifier, prefix, backbone)
    return classifier.to(next(backbone.parameters()).device)


def _set_transformers_labels(model: nn.Module, n_target: int, id2label: Sequence[str] | None = None) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_labels"):
        return
    names = list(id2label) if id2label is not None else [f"LABEL_{i}" for i in range(n_target)]
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


class TwoHeadModel(nn.Module):
    """A shared backbone with a target head and a source head (Liu et al., NeurIPS 2022, arXiv:2111.12292).

    Args:
        backbone (`nn.Module`): a timm or transformers image classifier or backbone, or a module holding one (as
            `TimmClassifier` holds a timm model). Its parameters are kept (not copied); its own classifier head is
            replaced by the target head.
        n_target (`int`): number of target classes.
        n_source (`int`): number of source classes (the label values of the selected pre-training data, e.g. 1000
            for ImageNet-1K labels).
        head_init_std (`float`, *optional*, defaults to `sqrt(2 / 2048)`): both heads are re-initialised
            `N(0, head_init_std)` with bias 0, as in the official code (its value, fixed for a 2048-wide ResNet-50,
            is kept whatever the width).
        id2label (`Sequence[str]`, *optional*): names of the target classes, for the saved transformers config.

    `forward(pixel_values, labels=None, source_pixel_values=None, source_labels=None)` returns a dict with the target
    head's `logits` (and `loss`, the target cross-entropy, given `labels`), and with source images the source head's
    `source_logits` (and `source_loss` given `source_labels`). Target and source images share one backbone forward.
    Without source images (evaluation, inference) only the target head runs. `save_pretrained` writes the target
    model alone, as an ordinary classifier.

    Example:

    ```python
    import torch
    from hf_regtools.data_selection import TwoHeadModel
    from hf_regtools.testing.tiny_models import transformers_resnet

    model = TwoHeadModel(transformers_resnet(), n_target=5, n_source=20)
    out = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3]),
                source_pixel_values=torch.randn(4, 3, 32, 32), source_labels=torch.tensor([0, 5, 10, 19]))
    assert out["logits"].shape == (4, 5) and out["source_logits"].shape == (4, 20)
    ```
    """

    def __init__(self, backbone: nn.Module, n_target: int, n_source: int, *,
                 head_init_std: float = OFFICIAL_HEAD_INIT_STD, id2label: Sequence[str] | None = None):
        super().__init__()
        for name, value in (("n_target", n_target), ("n_source", n_source)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (a number of classes), got {value!r}")
        if not head_init_std > 0:
            raise ValueError(f"head_init_std must be > 0, got {head_init_std!r}")
        if id2label is not None and len(id2label) != n_target:
            raise ValueError(f"id2label names {len(id2label)} classes, but n_target is {n_target}")
        self.base_model_name = _base_model_name(backbone)
        self.classifier = _as_classifier(backbone, n_target)
        _set_transformers_labels(self.classifier, n_target, id2label)
        head = find_classifier_head(self.classifier)
        _init_head_(head.linear, head_init_std)
        self.source_head = _init_head_(nn.Linear(head.in_features, n_source, device=head.linear.weight.device,
                                                 dtype=head.linear.weight.dtype), head_init_std)
        self.n_target, self.n_source, self.head_init_std = n_target, n_source, head_init_std
        self.id2label = list(id2label) if id2label is not None else None
        self._features: torch.Tensor | None = None
        head.linear.register_forward_pre_hook(self._capture_features)

    @property
    def library(self) -> str:
        """`"transformers"` when the target model is a transformers model (the timm wrapper too), else `"timm"`."""
        return "transformers" if _library_of_class(self.classifier) == "transformers" else "timm"

    @property
    def target_head(self) -> nn.Linear:
        return find_classifier_head(self.classifier).linear

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters of both heads (they get the head learning-rate multiplier)."""
        return [*self.target_head.parameters(), *self.source_head.parameters()]

    def _capture_features(self, module, inputs):
        self._features = inputs[0]

    def _classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.library == "transformers" or "pixel_values" in _forward_parameters(self.classifier):
            return logits_of(self.classifier(pixel_values=pixel_values))
        return logits_of(self.classifier(pixel_values))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                source_pixel_values: torch.Tensor | None = None,
                source_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n_target = pixel_values.shape[0]
        images = pixel_values if source_pixel_values is None else torch.cat([pixel_values, source_pixel_values])
        self._features = None
        logits = self._classify(images)
        outputs = {"logits": logits[:n_target]}
        if labels is not None:
            outputs["loss"] = nn.functional.cross_entropy(outputs["logits"], labels)
        if source_pixel_values is not None:
            features = self._features
            self._features = None
            outputs["source_logits"] = self.source_head(features[n_target:])
            if source_labels is not None:
                outputs["source_loss"] = nn.functional.cross_entropy(outputs["source_logits"], source_labels)
        if "loss" in outputs:
            outputs = {"loss": outputs.pop("loss"), **outputs}
        return outputs

    def target_model(self) -> nn.Module:
        """The model to save: the transformers classifier, or the timm model (with the target head in its place)."""
        if self.library == "transformers":
            return self.classifier
        return library_model(self.classifier)[1]

    def save_pretrained(self, save_directory: str | os.PathLike, *, selection=None, base_model: str | None = None,
                        **kwargs) -> None:
        """Save the target model as an ordinary classifier of `n_target` classes (the source head is dropped).

        transformers: `save_pretrained` of the classifier (config `num_labels` / `id2label` of the target); it loads
        with `from_pretrained`. timm: `model.safetensors` and a timm `config.json` (`num_classes = n_target`); it
        loads with `timm.create_model("hf-hub:...")` / `"local-dir:..."`. A model card records `base_model` and the
        selection (`selection`: a `DataSelectionReport` or its `to_dict()`), when given.
        """
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.target_model()
        if self.library == "transformers":
            model.save_pretrained(folder, **kwargs)
        else:
            from ..adapters import save_model

            save_model(model, folder)
        base_model = base_model or self.base_model_name
        if selection is not None or base_model:
            write_selection_card(folder / "README.md", selection=selection, base_model=base_model,
                                 library=self.library, n_target=self.n_target)


def _forward_parameters(module: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _base_model_name(backbone: nn.Module) -> str | None:
    """The Hub id or path the backbone was loaded from, if it records one."""
    try:
        _, inner = library_model(backbone)
    except UnsupportedModelError:
        return None
    config = getattr(backbone, "config", None) or getattr(inner, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None and not isinstance(config, dict) else None
    if not name:
        cfg = getattr(inner, "pretrained_cfg", None) or {}
        name = cfg.get("hf_hub_id") if isinstance(cfg, dict) else None
    return name or None


def selection_summary(selection) -> dict:
    """The parts of a selection a model card records: from a `DataSelectionReport`, its `to_dict()`, or a dict with
    `source`, `class_ids`, `weights` (and optionally `target`, `backbone`, `class_names`, `num_examples`)."""
    data = selection.to_dict() if hasattr(selection, "to_dict") else dict(selection)
    missing = [key for key in ("source", "class_ids", "weights") if key not in data]
    if missing:
        raise ValueError(f"the selection lacks {missing}; pass a DataSelectionReport or a dict with source, class_ids "
                         "and weights")
    if len(data["class_ids"]) != len(data["weights"]):
        raise ValueError(f"the selection has {len(data['class_ids'])} class_ids but {len(data['weights'])} weights")
    keys = ("source", "target", "backbone", "label_column", "class_ids", "class_names", "weights", "num_examples",
            "target_marginal_error", "settings")
    return {key: _plain(data[key]) for key in keys if data.get(key) is not None}


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_selection_card(path: str | os.PathLike, *, selection=None, base_model: str | None = None,
                         library: str | None = None, n_target: int | None = None) -> None:
    """Record `base_model` and the data selection in the model card at `path` (created if missing; the section is
    replaced on a second call)."""
    from huggingface_hub import ModelCard

    path = Path(path)
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n# Fine-tuned with selected "
                                                                  "pre-training data\n")
    if base_model:
        card.data.base_model = base_model
    if library and not getattr(card.data, "library_name", None):
        card.data.library_name = library
    tags = list(card.data.tags or [])
    for tag in ("hf-regtools", "data-selection"):
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    lines = [CARD_START, "## Pre-training data selection (hf_regtools)", ""]
    lines.append("Fine-tuned with two heads on the target data and on pre-training data selected by unbalanced "
                 "optimal transport between class prototypes (Liu et al., NeurIPS 2022, "
                 "[arXiv:2111.12292](https://arxiv.org/abs/2111.12292)); this model is the target classifier"
                 + (f" ({n_target} classes)." if n_target else "."))
    if selection is not None:
        summary = selection_summary(selection)
        lines += ["", "| | |", "|---|---|"]
        for key in ("source", "target", "backbone", "label_column", "num_examples", "target_marginal_error"):
            if key in summary:
                lines.append(f"| {key} | `{summary[key]}` |")
        lines.append(f"| classes | {len(summary['class_ids'])} |")
        names = summary.get("class_names") or [None] * len(summary["class_ids"])
        lines += ["", "| rank | source class | name | weight |", "|---|---|---|---|"]
        lines += [f"| {rank} | {cid} | {name or ''} | {weight:.6g} |" for rank, (cid, name, weight) in
                  enumerate(zip(summary["class_ids"], names, summary["weights"]), start=1)]
        lines += ["", "<details><summary>selection (JSON)</summary>", "", "```json",
                  json.dumps(summary, indent=1), "```", "", "</details>"]
    lines.append(CARD_END)
    text = card.text
    if CARD_START in text:
        text = text[:text.index(CARD_START)] + text[text.index(CARD_END) + len(CARD_END):]
    card.text = text.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    card.save(path)


def two_stream_loss(target_logits: torch.Tensor, target_labels: torch.Tensor, source_logits: torch.Tensor | None,
                    source_labels: torch.Tensor | None, *, lambda_u: float) -> tuple[torch.Tensor, dict]:
    """`CE(target) + lambda_u * CE(source)` (the paper's supervised two-head loss), with both parts (detached)."""
    loss_target = nn.functional.cross_entropy(target_logits.float(), target_labels)
    parts = {"loss_target": loss_target.detach()}
    if source_logits is None or source_logits.shape[0] == 0:
        return loss_target, parts
    loss_source = nn.functional.cross_entropy(source_logits.float(), source_labels)
    parts["loss_source"] = loss_source.detach()
    return loss_target + lambda_u * loss_source, parts


def fixmatch_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, *, threshold: float = 0.0,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The "without labels" term (paper Eq. 7; `fixmatch_fine_tune_top_1.py`): soft pseudo-labels of the weak view.

    `p = softmax(weak / T).detach()`, `mask = max p >= threshold`, and
    `L_u = -sum_i mask_i sum_c p_ic log softmax(strong)_ic / sum_i mask_i` (0 when nothing passes the threshold).
    Returns `(L_u, mask)`. The released script uses `threshold=0.0` (every sample) and `T = 1`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    probabilities = torch.softmax(weak_logits.detach().float() / temperature, dim=-1)
    mask = (probabilities.max(dim=-1).values >= threshold).float()
    per_sample = -(probabilities * torch.log_softmax(strong_logits.float(), dim=-1)).sum(dim=-1)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0), mask
