"""`select_pretraining_data`: prototypes of target and source, the UOT selection of source classes, and the
selected source subset with its report, in one call."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .prototypes import Backbone, ClassPrototypes, Extraction, check_dataset


@dataclass
class DataSelection:
    """What `select_pretraining_data` returns.

    Attributes:
        dataset (`datasets.Dataset`): every source example of the selected classes.
        report (`DataSelectionReport`): the selected label values (best first), names, weights, settings.
        source_prototypes (`ClassPrototypes`), target_prototypes (`ClassPrototypes`): the class means used.
    """

    dataset: Any
    report: Any
    source_prototypes: ClassPrototypes
    target_prototypes: ClassPrototypes


def _name_of(dataset: Any, given: str | None, fallback: str) -> str:
    if given:
        return given
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None)
    return name if name and name not in ("parquet", "arrow", "imagefolder", "json", "csv", "generator") else fallback


def select_pretraining_data(
    target: Any,
    source: Any,
    backbone: str | os.PathLike | nn.Module | Backbone,
    n_classes: int,
    *,
    label_column: str = "label",
    source_label_column: str | None = None,
    image_column: str | None = None,
    source_image_column: str | None = None,
    p_m: float = 0.1,
    reg: float = 1.0,
    reg_m: tuple[float, float] = (1.0, 100.0),
    max_iter: int = 1000,
    tol: float = 1e-6,
    batch_size: int = 64,
    transform: Callable | None = None,
    feature: Callable | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    progress: bool = True,
    revision: str | None = None,
    target_name: str | None = None,
    source_name: str | None = None,
    target_id: str | None = None,
    source_id: str | None = None,
    num_workers: int = 0,
    device: str | None = None,
) -> DataSelection:
    """Select the `n_classes` source classes closest to the target task and return all their examples.

    Prototypes of both datasets (`class_prototypes`, one backbone loaded once), the spec's cost on unit-normalised
    prototypes `(1 - cos) / p_m`, entropic unbalanced OT with `reg` (epsilon) and `reg_m = (tau_source, tau_target)`
    solved by POT (`uot_select_classes`), the top `n_classes` source classes by transported mass, and
    `select_pretraining_subset` of the source. Everything checkable is checked before any feature is computed: the
    columns, the label spaces, `n_classes` against a `ClassLabel` source, and a one-example probe of each dataset
    (the backbone gives features, and of one width on both).

    Args:
        target, source (`datasets.Dataset` or `datasets.IterableDataset`): labelled target data; the pre-training data
            (streamed where it is an `IterableDataset`).
        backbone (`str`, `os.PathLike` or `nn.Module`): see `class_prototypes`.
        n_classes (`int`): source classes to keep (the paper: 100; 500 without labels).
        label_column (`str`, *optional*, defaults to `"label"`): the target's label column.
        source_label_column (`str`, *optional*): the source's (default: `label_column`).
        image_column, source_image_column (`str`, *optional*): see `class_prototypes`.
        p_m, reg, reg_m, max_iter, tol: see `uot_select_classes` (the spec's defaults).
        batch_size, transform, feature, cache_dir, progress, revision, num_workers, device: see `class_prototypes`.
        seed (`int`, *optional*): shuffle the selected subset with this seed.
        target_name, source_name (`str`, *optional*): how the report names the datasets (default: their
            `info.dataset_name`).
        target_id, source_id (`str`, *optional*): cache identities instead of the datasets' fingerprints.

    Raises:
        `ValueError`: see `class_prototypes`; `n_classes` out of range; feature widths that differ.
    """
    from .report import DataSelectionReport, select_pretraining_subset
    from .uot import uot_select_classes

    source_label_column = source_label_column or label_column
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    target_name = _name_of(target, target_name, "target")
    source_name = _name_of(source, source_name, "source")
    target_view = check_dataset(target, label_column, image_column=image_column, name=f"target {target_name}")
    source_view = check_dataset(source, source_label_column, image_column=source_image_column,
                                name=f"source {source_name}")
    if source_view.num_classes is not None and n_classes > source_view.num_classes:
        raise ValueError(f"n_classes={n_classes} is larger than the {source_view.num_classes} classes of the source "
                         f"{source_name}; choose at most {source_view.num_classes}")
    if not isinstance(backbone, Backbone):
        backbone = Backbone(backbone, revision=revision)
    options = dict(batch_size=batch_size, transform=transform, feature=feature, cache_dir=cache_dir,
                   num_workers=num_workers, device=device)
    extractions = {"target": Extraction(backbone, target_view, dataset_id=target_id, **options),
                   "source": Extraction(backbone, source_view, dataset_id=source_id, **options)}
    cached = {role: extraction.cached() for role, extraction in extractions.items()}
    widths = {role: prototypes.feature_dim if prototypes is not None else extractions[role].probe()
              for role, prototypes in cached.items()}
    if widths["target"] != widths["source"]:
        raise ValueError(f"{backbone.name} gives {widths['target']}-d features on the target {target_name} and "
                         f"{widths['source']}-d on the source {source_name}; give both datasets inputs of one size "
                         "(e.g. the same transform=)")
    prototypes = {role: cached[role] if cached[role] is not None else extraction.prototypes(progress=progress)
                  for role, extraction in extractions.items()}
    source_prototypes, target_prototypes = prototypes["source"], prototypes["target"]
    if n_classes > len(source_prototypes):
        raise ValueError(f"n_classes={n_classes} is larger than the {len(source_prototypes)} classes of the source "
                         f"{source_name}; choose at most {len(source_prototypes)}")
    selection = uot_select_classes(source_prototypes.prototypes, target_prototypes.prototypes, n_classes, p_m=p_m,
                                   reg=reg, reg_m=tuple(reg_m), max_iter=max_iter, tol=tol)
    rows = [int(row) for row in selection.class_ids]
    class_ids = [source_prototypes.labels[row] for row in rows]
    names = [source_prototypes.names[row] for row in rows] if source_prototypes.names is not None else None
    weights = [float(selection.importance[row]) for row in rows]
    subset = select_pretraining_subset(source, class_ids, source_label_column, seed=seed)
    settings = {"n_classes": n_classes, "p_m": p_m, "reg": reg, "reg_m": list(reg_m), "max_iter": max_iter,
                "tol": tol, "feature": "pooled_features" if feature is None else "custom",
                "feature_dim": source_prototypes.feature_dim, "target_label_column": label_column,
                "target_classes": len(target_prototypes), "source_classes": len(source_prototypes),
                "batch_size": batch_size, "seed": seed,
                "preprocessing": "backbone default" if transform is None else "custom"}
    report = DataSelectionReport(source=source_name, target=target_name, backbone=backbone.name,
                             label_column=source_label_column, class_ids=class_ids, class_names=names,
                             weights=weights, target_marginal_error=float(selection.target_marginal_error),
                             num_examples=len(subset), settings=settings)
    return DataSelection(subset, report, source_prototypes, target_prototypes)
