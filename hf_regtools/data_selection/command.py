"""`hf-regtools select-data --target T --source S --backbone MODEL --num-classes N --output DIR`: the source classes
closest to a target task by unbalanced OT, saved as a dataset with its report and a dataset card, optionally pushed
as a dataset repo.

```
hf-regtools select-data --target ./flowers --source imagenet-1k --streaming --backbone hf-hub:timm/resnet18.a1_in1k \
    --num-classes 100 --output flowers-imagenet-100 --cache-dir ~/.cache/prototypes
```

`--target` and `--source` are each a dataset saved with `save_to_disk` (a `Dataset` or a `DatasetDict`), an image
folder (one subfolder per class), or a Hub dataset id (`load_dataset`, streamed with `--streaming`). The output folder
holds the selected subset (`datasets.load_from_disk(DIR)`), `report.json`, `report.png` and `README.md` (the dataset
card); it is written atomically: nothing half-written is left on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZE = 64
LABEL_COLUMNS = ("label", "labels", "class", "target", "category", "fine_label")


class SelectDataError(ValueError):
    """Bad input to `hf-regtools select-data` (datasets, columns, backbone, options); the message names it and the fix."""


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `select-data` sub-command's options (imports nothing heavy)."""
    data_help = ("a dataset saved with `save_to_disk` (Dataset or DatasetDict), an image folder (one subfolder of "
                 "images per class), or a Hub dataset id")
    parser.add_argument("--target", required=True, help=f"the labelled target data: {data_help}")
    parser.add_argument("--source", required=True, help=f"the pre-training data to select from: {data_help}")
    parser.add_argument("--backbone", required=True, help="the pretrained backbone: Hub id (org/name[@revision]), "
                                                          "timm hf-hub: id or pretrained tag, or a local folder")
    parser.add_argument("--num-classes", type=_positive(int), required=True,
                        help="source classes to select (the paper: 100)")
    parser.add_argument("--output", required=True, help="output folder (the subset, report.json, report.png, "
                                                        "README.md); an existing empty folder is filled in place")
    data = parser.add_argument_group("data")
    data.add_argument("--label-column", help=f"the target's label column (default: one of {', '.join(LABEL_COLUMNS)}, "
                                             "else the only ClassLabel feature)")
    data.add_argument("--source-label-column", help="the source's label column (default: as for the target)")
    data.add_argument("--target-split", help="split of the target (default: train)")
    data.add_argument("--source-split", help="split of the source (default: train)")
    data.add_argument("--streaming", action="store_true",
                      help="stream the source instead of downloading it whole (the target is loaded whole)")
    data.add_argument("--batch-size", type=_positive(int), default=DEFAULT_BATCH_SIZE,
                      help=f"examples per forward (default: {DEFAULT_BATCH_SIZE})")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for decoding (default: 0)")
    data.add_argument("--cache-dir", help="cache the class prototypes there (a re-run skips the feature extraction)")
    data.add_argument("--seed", type=int, help="shuffle the selected subset with this seed (default: source order)")
    uot = parser.add_argument_group("unbalanced OT (the spec's defaults)")
    uot.add_argument("--p-m", type=_positive(float), default=0.1, help="cost temperature: M = (1 - cos) / p_m "
                                                                       "(default: 0.1)")
    uot.add_argument("--reg", type=_positive(float), default=1.0, help="entropic regularization epsilon (default: 1)")
    uot.add_argument("--tau-source", type=_positive(float), default=1.0,
                     help="KL relaxation of the source marginal (default: 1)")
    uot.add_argument("--tau-target", type=_positive(float), default=100.0,
                     help="KL relaxation of the target marginal (default: 100)")
    output = parser.add_argument_group("output")
    output.add_argument("--overwrite", action="store_true", help="replace the content of an existing non-empty output "
                                                                 "folder")
    output.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the output as a dataset repo (org/name, or "
                                                                 "name for your own namespace)")
    output.add_argument("--private", action="store_true", help="create the Hub repo as private")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------------ data


def load_split(reference: str, *, split: str | None, streaming: bool, option: str):
    """Load one split of `reference` (saved dataset, image folder or Hub id); returns `(dataset, description)`.

    Raises:
        `SelectDataError`: a missing path, a file, a split that does not exist, or a dataset that cannot be loaded.
    """
    from .._data import load_split as load_data_split

    dataset, _ = load_data_split(reference, split=split, streaming=streaming, option=option,
                                 split_option=f"{option}-split", error_class=SelectDataError)
    return dataset, str(reference)


def label_column_of(dataset, chosen: str | None, option: str, reference: str) -> str:
    """The label column: `chosen`, else one of `LABEL_COLUMNS`, else the only `ClassLabel` feature.

    Raises:
        `SelectDataError`: none found; the message lists the columns and names the option.
    """
    import datasets

    features = dataset.features
    columns = list(features) if features is not None else list(next(iter(dataset.take(1)), {}))
    if chosen is not None:
        if chosen not in columns:
            raise SelectDataError(f"{reference} has no label column {chosen!r}; its columns are {', '.join(columns)}. "
                                  f"Name the label column with {option}")
        return chosen
    found = next((name for name in LABEL_COLUMNS if name in columns), None)
    if found is None and features is not None:
        labels = [name for name in columns if isinstance(features[name], datasets.ClassLabel)]
        found = labels[0] if len(labels) == 1 else None
    if found is None:
        raise SelectDataError(f"{reference} has no label column; its columns are {', '.join(columns)}. Name the label "
                              f"column with {option}")
    return found


# ---------------------------------------------------------------------------------------------------- output


@dataclass
class SelectDataRun:
    """A finished selection with what the card names: `selection` (`DataSelection`) and the command's settings."""

    selection: Any
    target: str
    source: str
    backbone: str

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
        """Write the subset (`save_to_disk`), `report.json`, `report.png` and `README.md` into `output_dir`
        atomically."""
        from .._io import atomic_directory

        with atomic_directory(output_dir, overwrite=overwrite) as staging:
            self.selection.dataset.save_to_disk(str(staging))
            self.selection.report.save_json(staging / "report.json")
            self.selection.report.plot(staging / "report.png")
            dataset_card(self.selection.report, repo_id=repo_id).save(staging / "README.md")
        return Path(output_dir)

    def summary(self) -> str:
        report = self.selection.report
        names = report.class_names or [str(i) for i in report.class_ids]
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        return (f"selected {len(report.class_ids)} classes of {report.source} for {report.target} "
                f"({report.num_examples} examples; target marginal error {report.target_marginal_error:.3g}): {shown}")


def dataset_card(report, *, repo_id: str | None = None):
    """The dataset card of a selection: YAML metadata (tags, source dataset, the selection and its settings) and a
    body with the settings and the selected classes (huggingface_hub `DatasetCard`)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..hub import model_card_template

    names = report.class_names or [None] * len(report.class_ids)
    classes = [{"id": int(i), "name": name if name is not None else "", "weight": float(w)}
               for i, name, w in zip(report.class_ids, names, report.weights)]
    metadata = {"technique": "data_selection", "target": report.target, "source": report.source,
                "backbone": report.backbone, "label_column": report.label_column, "num_classes": len(classes),
                "num_examples": report.num_examples, "target_marginal_error": report.target_marginal_error,
                "settings": report.settings, "selected_classes": classes}
    pretty = f"{report.source}: {len(classes)} classes selected for {report.target}"
    data = DatasetCardData(tags=["hf-regtools", "data-selection"], task_categories=["image-classification"],
                           pretty_name=pretty, hf_regtools=metadata,
                           **({"source_datasets": [report.source]} if "/" in report.source
                              and not Path(report.source).exists() else {}))
    return DatasetCard.from_template(data, template_path=str(model_card_template("data_selection_subset")),
                                     pretty_name=pretty, num_classes=len(classes), source=report.source,
                                     target=report.target, backbone=report.backbone,
                                     feature=report.settings.get("feature", "pooled_features"),
                                     num_examples=report.num_examples, label_column=report.label_column,
                                     settings={key: value for key, value in report.settings.items()},
                                     target_marginal_error=report.target_marginal_error, classes=classes,
                                     repo_id=repo_id)


# ------------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace, *, output_exists) -> int:
    """Run `hf-regtools select-data` on parsed options: checks (output, push target, datasets, columns, N, backbone)
    first, then the feature extraction, the selection and the output."""
    from .._io import check_output_dir
    from ..cli import save_and_push

    try:
        output = check_output_dir(args.output, overwrite=args.overwrite)
    except FileExistsError as error:
        raise output_exists(args.output) from error
    push_id = None
    if args.push_to_hub:
        from ..hub import push_target

        push_id = push_target(args.push_to_hub)
    target, target_name = load_split(args.target, split=args.target_split, streaming=False, option="--target")
    source, source_name = load_split(args.source, split=args.source_split, streaming=args.streaming,
                                     option="--source")
    label_column = label_column_of(target, args.label_column, "--label-column", f"--target {args.target}")
    source_label_column = label_column_of(source, args.source_label_column or args.label_column or None,
                                          "--source-label-column", f"--source {args.source}")
    from .prototypes import Backbone
    from .selection import select_pretraining_data

    backbone = Backbone(args.backbone)
    try:
        selection = select_pretraining_data(
            target, source, backbone, args.num_classes, label_column=label_column,
            source_label_column=source_label_column, p_m=args.p_m, reg=args.reg,
            reg_m=(args.tau_source, args.tau_target), batch_size=args.batch_size, cache_dir=args.cache_dir,
            seed=args.seed, progress=not args.no_progress, target_name=target_name, source_name=source_name,
            num_workers=args.num_workers)
    except ValueError as error:
        if isinstance(error, SelectDataError):
            raise
        message = str(error).replace("n_classes=", "--num-classes ").replace("label_column=", "--label-column")
        raise SelectDataError(message) from error
    run = SelectDataRun(selection, target_name, source_name, backbone.name)
    return save_and_push(run, output, args, push_id=push_id, summary=run.summary(),
                         commit_message=f"Data selection: {args.num_classes} classes of {source_name} for "
                                        f"{target_name}", repo_type="dataset")
