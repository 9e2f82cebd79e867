"""`hf-regtools gradinit MODEL --data DATA --output DIR`: GradInit on a classifier, saved with its preprocessing and a
model card, optionally pushed to the Hub.

```
hf-regtools gradinit google/vit-base-patch16-224-in21k --data ./flowers --iterations 100 --output vit-gradinit
hf-regtools gradinit hf-hub:timm/resnet50.a1_in1k --random-init --data ./imagenette --output r50-gradinit
hf-regtools gradinit ./bert-tiny --data ./sst2 --text-column sentence --max-length 128 --output bert-gradinit
```

The model gets a classification head of the data's classes: transformers image models through
`AutoModelForImageClassification` (timm models saved by transformers' `TimmWrapper` included), text models through
`AutoModelForSequenceClassification`, timm models through `timm.create_model(..., num_classes=N)`. The task follows
from the model (its `model_type` has an image-classification or a sequence-classification class in transformers; timm
models are image models). Parsing the options imports nothing heavy: torch, transformers, timm and datasets are
imported when the command runs, after the option checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _data
from .config import GradInitConfig

DEFAULT_BATCH_SIZE = 64
IMAGE_COLUMNS = ("image", "img", "images", "picture", "pixel_values")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "query")
TEXT_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                     ("question1", "question2"), ("question", "passage"), ("text_a", "text_b"))
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template.*")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
SCALES_FILE = "gradinit_scales.json"
_CONFIG_DEST = "gradinit_config_"


class GradInitCommandError(ValueError):
    """Bad input to `hf-regtools gradinit` (data, columns, model, options); the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gradinit` sub-command's options (imports nothing heavy)."""
    parser.add_argument("model", help="Hub id (org/name[@revision]), timm hf-hub:org/name id or pretrained tag, or a "
                                      "local folder (transformers or timm)")
    parser.add_argument("--data", required=True,
                        help="a dataset saved with `save_to_disk` (Dataset or DatasetDict), an image folder (one "
                             "subfolder of images per class, optionally under train/ test/), or a dataset name "
                             "`load_dataset` finds (from the cache with HF_HUB_OFFLINE=1)")
    parser.add_argument("--output", required=True, help="output folder (weights, config, preprocessing, "
                                                        f"{SCALES_FILE}, model card); an existing empty folder is "
                                                        "filled in place")
    model = parser.add_argument_group("model")
    model.add_argument("--revision", help="model revision on the Hub (branch, tag or commit)")
    model.add_argument("--library", choices=("transformers", "timm"),
                       help="the model's library (default: detected from its config.json)")
    model.add_argument("--num-labels", type=_positive_int,
                       help="classes of the classification head (default: the data's label count; a head of another "
                            "size is replaced by a new one)")
    model.add_argument("--random-init", action="store_true",
                       help="start from a fresh random initialization of the architecture in config.json (seeded "
                            "by --seed), as the paper does, instead of the model's weights (the default: e.g. a "
                            "weight-selected student or a saved initialization); needed when the model has no weights")
    model.add_argument("--device", help="where GradInit runs, e.g. cpu, cuda, cuda:1 (default: cuda when available, "
                                        "else cpu)")
    data = parser.add_argument_group("data")
    data.add_argument("--split", help="split of a DatasetDict, image folder or named dataset (default: train)")
    data.add_argument("--image-column", help=f"column of images (default: the Image feature, else one of "
                                             f"{', '.join(IMAGE_COLUMNS)})")
    data.add_argument("--text-column", help="column of texts, or two comma-separated columns of text pairs (default: "
                                            f"one of {', '.join(TEXT_COLUMNS)} or a usual pair such as "
                                            "sentence1,sentence2)")
    data.add_argument("--label-column", help=f"column of class labels (default: one of {', '.join(LABEL_COLUMNS)}, "
                                             "else the only ClassLabel feature)")
    data.add_argument("--max-length", type=_positive_int,
                      help="text models: truncate to this many tokens (default: the smaller of the tokenizer's "
                           "model_max_length and the model's max_position_embeddings); batches are padded to "
                           "their longest text")
    data.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                      help=f"examples per batch drawn by gradinit_ (default: {DEFAULT_BATCH_SIZE}): GradInit takes "
                           "two for S and one more for the objective batch each iteration, as the official code "
                           "takes halves of its training batch of 128; NIO takes one (64 in the released config)")
    data.add_argument("--seed", type=int, default=0, help="seed of the batch order and of any random weights "
                                                          "(default: 0)")
    settings = parser.add_argument_group(
        "GradInit settings", "fields of GradInitConfig (see the method card); --gamma inf disables the constraint, "
                             "--max-scale none leaves the scales unbounded; with an NIO --objective, --gamma and --lr "
                             "default to those of nio_ (the released NIO config)")
    for config_field in dataclasses.fields(GradInitConfig):
        _add_config_option(settings, config_field)
    hub = parser.add_argument_group("output")
    hub.add_argument("--overwrite", action="store_true", help="replace the content of an existing non-empty output "
                                                              "folder")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="also create this Hub repo (org/name, or name for your "
                                                              "own namespace) and upload the folder")
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    hub.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_config_option(group, config_field: dataclasses.Field) -> None:
    flag = "--" + config_field.name.replace("_", "-")
    default = config_field.default if config_field.default is not dataclasses.MISSING else config_field.default_factory()
    annotation = str(config_field.type)
    choices = config_field.metadata.get("choices")
    help_text = config_field.metadata.get("help", config_field.name.replace("_", " "))
    help_text += f" (default: {_format_value(default)})"
    kwargs: dict[str, Any] = dict(dest=_CONFIG_DEST + config_field.name, default=argparse.SUPPRESS, help=help_text)
    if not isinstance(default, bool) and not choices:
        kwargs["metavar"] = config_field.name.upper()
    if isinstance(default, bool):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if isinstance(default, int):
        kind = _optional(int) if "None" in annotation else int
    elif isinstance(default, float) or (default is None and "float" in annotation):
        kind = _optional(float) if "None" in annotation else float
    elif isinstance(default, tuple):
        element = type(default[0]) if default else str
        kind = _sequence(element, len(default) if "..." not in annotation and default else None)
        kwargs["metavar"] = ",".join([element.__name__.upper()] * max(len(default), 1))
    elif default is None and ("tuple" in annotation or "list" in annotation or "Sequence" in annotation):
        kind = _sequence(int if "int" in annotation and "str" not in annotation else str, None, optional=True)
        kwargs["metavar"] = "A,B,..."
    elif default is None and "int" in annotation:
        kind = _optional(int)
    else:
        kind = str
    group.add_argument(flag, type=kind, choices=choices if kind is str else None, **kwargs)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _optional(kind):
    def parse(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or 'none', got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _sequence(kind, length: int | None, *, optional: bool = False):
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            values = tuple(kind(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values or (length is not None and len(values) != length):
            count = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"expected {count}comma-separated {kind.__name__} values, got {text!r}")
        return values

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_from_args(args: argparse.Namespace) -> GradInitConfig:
    """The `GradInitConfig` of the parsed options; a value `GradInitConfig` refuses is reported with its option.

    With an NIO objective (`--objective gc_gn_sqrt`, ...), `--gamma` and `--lr` default to the released NIO
    configuration (`NIO_DEFAULTS`, as `nio_` does). `--module-types reference` selects the official CIFAR module set.

    Raises:
        `GradInitCommandError`: an option's value (or a combination) is invalid; the message names the option(s).
    """
    given = {name[len(_CONFIG_DEST):]: value for name, value in vars(args).items() if name.startswith(_CONFIG_DEST)}
    if given.get("module_types") == ("reference",):
        given["module_types"] = "reference"
    defaults = {}
    if given.get("objective", "gradinit") != "gradinit":
        from .functional import NIO_DEFAULTS

        defaults = {key: value for key, value in NIO_DEFAULTS.items() if key not in given}
    try:
        return GradInitConfig(**defaults, **given)
    except (ValueError, TypeError) as error:
        culprits = []
        for name, value in given.items():
            try:
                GradInitConfig(**{name: value})
            except (ValueError, TypeError):
                culprits.append(name)
        culprits = culprits or [name for name in given if name in str(error)] or list(given)
        options = ", ".join(f"{_flag(name)} {_format_value(given[name])}" for name in culprits)
        raise GradInitCommandError(f"invalid GradInit setting ({options}): {error}") from error


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class DataSpec:
    """The training data, checked: the split, its columns and label space.

    Attributes:
        dataset (`datasets.Dataset`): the split.
        description (`str`): how the card names it, e.g. `"./flowers (image folder), split train"`.
        task (`str`): `"image"` or `"text"`.
        inputs (`tuple[str, ...]`): the image column, or one or two text columns.
        label_column (`str`): the label column.
        label_names (`list[str]`): class names, index = label id.
        label_ids (`dict`, *optional*): string label -> id, for string label columns.
    """

    dataset: Any
    description: str
    task: str
    inputs: tuple[str, ...]
    label_column: str
    label_names: list[str]
    label_ids: dict[str, int] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.dataset)


def data_kind(reference: str | os.PathLike) -> str:
    """`"saved"` (save_to_disk), `"imagefolder"` or `"name"` (for `load_dataset`), checked without loading.

    Raises:
        `GradInitCommandError`: a path that does not exist, or a folder that is neither kind.
    """
    return _data.data_kind(reference, error_class=GradInitCommandError)


def load_data(reference: str | os.PathLike, *, task: str, split: str | None = None, image_column: str | None = None,
              text_column: str | None = None, label_column: str | None = None) -> DataSpec:
    """Load the split and find its input and label columns for `task` (`"image"` or `"text"`).

    Raises:
        `GradInitCommandError`: the data cannot be loaded, the split does not exist, or a column is missing (the
            message lists the available columns and the option to pass).
    """
    dataset, where = _data.load_split(reference, split=split, error_class=GradInitCommandError)
    dataset = dataset.with_format(None)
    columns = list(dataset.column_names)
    features = dataset.features
    if task == "image":
        inputs = (_image_column(features, columns, image_column, reference),)
    else:
        inputs = _text_columns(features, columns, text_column, reference)
    label = _label_column(features, columns, label_column, reference, exclude=inputs)
    names, ids = _label_space(dataset, features, label, reference)
    return DataSpec(dataset, f"{where}, {len(dataset)} examples", task, inputs, label, names, ids)


def _missing(reference, option: str, what: str, columns: list[str], value: str | None = None) -> GradInitCommandError:
    found = f"has no column {value!r}" if value else f"has no {what} column"
    return GradInitCommandError(f"--data {reference} {found}; its columns are {', '.join(columns)}. "
                                f"Name the {what} column with {option}")


def _image_column(features, columns: list[str], chosen: str | None, reference) -> str:
    import datasets

    if chosen is not None:
        if chosen not in columns:
            raise _missing(reference, "--image-column", "image", columns, chosen)
        if not isinstance(features[chosen], datasets.Image):
            raise GradInitCommandError(
                f"--image-column {chosen}: the column holds {_describe_feature(features[chosen])}, not images; "
                f"cast it first (`dataset.cast_column({chosen!r}, datasets.Image())`) or choose another column")
        return chosen
    images = [name for name in columns if isinstance(features[name], datasets.Image)]
    if len(images) == 1:
        return images[0]
    named = [name for name in IMAGE_COLUMNS if name in images]
    if named:
        return named[0]
    raise _missing(reference, "--image-column", "image", columns)


def _text_columns(features, columns: list[str], chosen: str | None, reference) -> tuple[str, ...]:
    if chosen is not None:
        names = tuple(part.strip() for part in chosen.split(",") if part.strip())
        if not 1 <= len(names) <= 2:
            raise GradInitCommandError(f"--text-column {chosen}: give one column, or two comma-separated columns of "
                                       "text pairs")
        for name in names:
            if name not in columns:
                raise _missing(reference, "--text-column", "text", columns, name)
            if not _is_string(features[name]):
                raise GradInitCommandError(f"--text-column {name}: the column holds {_describe_feature(features[name])}, "
                                           "not strings; choose another column")
        return names
    for pair in TEXT_PAIR_COLUMNS:
        if all(name in columns and _is_string(features[name]) for name in pair):
            return pair
    for name in TEXT_COLUMNS:
        if name in columns and _is_string(features[name]):
            return (name,)
    raise _missing(reference, "--text-column", "text", columns)


def _is_string(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _describe_feature(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__}({dtype})" if dtype else type(feature).__name__


def _label_column(features, columns: list[str], chosen: str | None, reference, *, exclude: tuple[str, ...]) -> str:
    import datasets

    if chosen is not None:
        if chosen not in columns:
            raise _missing(reference, "--label-column", "label", columns, chosen)
        return chosen
    for name in LABEL_COLUMNS:
        if name in columns and name not in exclude:
            return name
    class_labels = [name for name in columns if isinstance(features[name], datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    raise _missing(reference, "--label-column", "label", columns)


def _label_space(dataset, features, column: str, reference) -> tuple[list[str], dict[str, int] | None]:
    import datasets

    feature = features[column]
    if isinstance(feature, datasets.ClassLabel):
        values = dataset.unique(column)
        if any(value < 0 for value in values):
            raise GradInitCommandError(f"--label-column {column}: the split has unlabeled examples (label -1); choose "
                                       "a labeled --split")
        return list(feature.names), None
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        names = sorted(dataset.unique(column))
        return names, {name: index for index, name in enumerate(names)}
    if dtype is None or not (dtype.startswith("int") or dtype.startswith("uint")):
        raise GradInitCommandError(f"--label-column {column}: the column holds {_describe_feature(feature)}; class "
                                   "labels must be integers, strings or a ClassLabel")
    values = dataset.unique(column)
    if not values:
        raise GradInitCommandError(f"--data {reference}: the split is empty")
    if min(values) < 0:
        raise GradInitCommandError(f"--label-column {column}: negative labels ({min(values)}); class labels are 0..N-1 "
                                   "(unlabeled splits use -1: choose a labeled --split)")
    return [str(index) for index in range(max(values) + 1)], None


# ----------------------------------------------------------------------------------------------------- model


@dataclass
class GradInitRun:
    """What `run_gradinit` returns: the initialized model, its report and what the card records.

    Attributes:
        model (`nn.Module`): the model, rescaled in place by `gradinit_`.
        report (`GradInitReport`): the learned scales and step counts.
        library (`str`): `"timm"` or `"transformers"`.
        task (`str`): `"image"` or `"text"`.
        model_reference (`str`): the Hub id (or folder) of the model.
        model_revision (`str`, *optional*): the commit sha when pulled from the Hub.
        model_on_hub (`bool`): whether `model_reference` is a Hub repo id (then the card's `base_model`).
        random_init (`bool`): the weights were drawn from the config's initialization, not loaded.
        head (`str`): what happened to the classification head.
        num_labels (`int`): classes of the head.
        config (`GradInitConfig`): the GradInit settings.
        data (`DataSpec`): the data.
        preprocessing (`dict[str, str]`): by kind, how inputs were prepared.
        preprocessing_files (`tuple[Path, ...]`): the model's preprocessing files, copied by `save`.
        batch_size (`int`), seed (`int`), device (`str`): as run.
        license (`dict[str, str]`): the model's declared license, empty if none.
    """

    model: Any
    report: Any
    library: str
    task: str
    model_reference: str
    model_revision: str | None
    model_on_hub: bool
    random_init: bool
    head: str
    num_labels: int
    config: GradInitConfig
    data: DataSpec
    preprocessing: dict[str, str]
    preprocessing_files: tuple[Path, ...]
    batch_size: int
    seed: int
    device: str
    license: dict[str, str] = field(default_factory=dict)

    def save(self, output_dir: str | os.PathLike, *, overwrite: bool = False, repo_id: str | None = None) -> Path:
        """Write model, preprocessing files, `gradinit_scales.json` and the card atomically; see `save_run`."""
        return save_run(self, output_dir, overwrite=overwrite, repo_id=repo_id)

    def summary(self) -> str:
        scales = list(self.report.scales.values())
        spread = f" in [{min(scales):.4g}, {max(scales):.4g}]" if scales else ""
        return (f"GradInit on {self.model_reference}: {self.report.constraint_steps} constraint steps, "
                f"{self.report.objective_steps} objective steps; {len(scales)} tensor scales{spread}")


def task_of(library: str, config: dict[str, Any]) -> str:
    """`"image"` or `"text"`: what classification task the model's config supports.

    Raises:
        `GradInitCommandError`: a transformers model type with neither an image- nor a sequence-classification class.
    """
    if library == "timm":
        return "image"
    from transformers.models.auto.modeling_auto import (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    model_type = config.get("model_type")
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    if model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text"
    raise GradInitCommandError(f"transformers {model_type} has neither an image-classification nor a "
                               "sequence-classification model class; hf-regtools gradinit trains classifiers")


def run_gradinit(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    config: GradInitConfig | None = None,
    revision: str | None = None,
    library: str | None = None,
    num_labels: int | None = None,
    random_init: bool = False,
    split: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    max_length: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
    **settings: Any,
) -> GradInitRun:
    """Load a classifier and its data, run `gradinit_` on it, and return the result (what `hf-regtools gradinit`
    saves).

    Everything that can be checked from configs and the data is checked before any weight is fetched or loaded: the
    data reference, the model's config and task, the columns, the labels and the preprocessing files.

    Args:
        model (`str` or `os.PathLike`): Hub id, timm `hf-hub:` id or pretrained tag, or local folder.
        data (`str` or `os.PathLike`): a `save_to_disk` folder, an image folder, or a dataset name (see `load_data`).
        config (`GradInitConfig`, *optional*): the GradInit settings.
        revision, library: see `hf_regtools.hub.resolve_model`.
        num_labels (`int`, *optional*): classes of the head (default: the data's).
        random_init (`bool`, *optional*, defaults to `False`): random weights from the config instead of the model's.
        split, image_column, text_column, label_column: see `load_data`.
        max_length (`int`, *optional*): text models: truncation length.
        batch_size (`int`, *optional*, defaults to 64): examples per batch.
        seed (`int`, *optional*, defaults to 0): seed of the batch order and of random weights.
        device (`str`, *optional*): default `cuda` when available, else `cpu`.
        progress (`bool`, *optional*): show `gradinit_`'s progress bar.
        settings: `GradInitConfig` fields, instead of `config`.

    Example:

    ```python
    from hf_regtools.gradinit.command import run_gradinit

    run = run_gradinit("google/vit-base-patch16-224-in21k", "./flowers", iterations=100)
    run.save("vit-gradinit")
    ```
    """
    from .. import hub

    if config is not None and settings:
        raise ValueError("pass GradInit settings either as config= or as keyword arguments, not both")
    config = config or GradInitConfig(**settings)
    data_kind(data)
    resolved = hub.resolve_model(model, revision=revision, library=library, weights=False)
    task = task_of(resolved.library, resolved.config())
    spec = load_data(data, task=task, split=split, image_column=image_column, text_column=text_column,
                     label_column=label_column)
    if num_labels is not None and num_labels < spec.num_labels:
        raise GradInitCommandError(f"--num-labels {num_labels}: the data has {spec.num_labels} classes (labels up to "
                                   f"{spec.num_labels - 1})")
    if len(spec) < batch_size:
        raise GradInitCommandError(f"--batch-size {batch_size}: the data has only {len(spec)} examples; choose a "
                                   "smaller batch size")
    label_names = spec.label_names + [str(i) for i in range(spec.num_labels, num_labels or spec.num_labels)]
    files, preprocessing_folder = _preprocessing_files(resolved, task, hub)
    if not random_init:
        resolved = hub.fetch_weights(resolved)
        if not any(resolved.folder.glob("*.safetensors")) and not any(resolved.folder.glob("pytorch_model*.bin")):
            raise GradInitCommandError(f"{resolved.reference} has no weights (no *.safetensors or pytorch_model.bin); "
                                       "pass --random-init to start from the initialization of its config")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with hub.hub_errors("cannot load", resolved.repo_id):
        built, head = _build_model(resolved, task, label_names, random_init=random_init)
    built.to(device)
    batches, preprocessing = _batches(built, resolved, preprocessing_folder, spec, task, batch_size=batch_size,
                                      seed=seed, device=device, max_length=max_length)
    from . import gradinit_

    report = gradinit_(built, batches, config=config, progress=progress)
    return GradInitRun(model=built, report=report, library=resolved.library, task=task,
                       model_reference=resolved.hub_reference, model_revision=resolved.revision,
                       model_on_hub=resolved.repo_id is not None, random_init=random_init, head=head,
                       num_labels=len(label_names), config=config, data=spec,
                       preprocessing=preprocessing, preprocessing_files=files, batch_size=batch_size, seed=seed,
                       device=device, license=_license(resolved.folder))


def _preprocessing_files(resolved, task: str, hub) -> tuple[tuple[Path, ...], Path]:
    """The model's preprocessing files to copy (fetched from the Hub for text models) and their folder, checked."""
    folder = resolved.folder
    if resolved.library == "timm":
        return (), folder
    if task == "image":
        path = folder / IMAGE_PROCESSOR_FILE
        if path.is_file():
            return (path,), folder
        from transformers import AutoImageProcessor

        try:  # transformers' TimmWrapper reads its image processor from config.json
            AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise GradInitCommandError(
                f"{resolved.reference} has no image processor ({IMAGE_PROCESSOR_FILE}); save one next to the model "
                "(`AutoImageProcessor.from_pretrained(...).save_pretrained(folder)`)") from error
        return (), folder
    if resolved.repo_id is not None:
        from huggingface_hub import snapshot_download

        with hub.hub_errors("cannot fetch the tokenizer of", resolved.repo_id):
            folder = Path(snapshot_download(resolved.repo_id, revision=resolved.revision,
                                            allow_patterns=list(TOKENIZER_PATTERNS)))
    import fnmatch

    found = tuple(sorted(path for path in folder.iterdir() if path.is_file()
                         and any(fnmatch.fnmatch(path.name, pattern) for pattern in TOKENIZER_PATTERNS)))
    if not any(path.name.startswith(("tokenizer", "vocab.")) for path in found):
        raise GradInitCommandError(f"{resolved.reference} has no tokenizer (tokenizer.json, tokenizer_config.json or a "
                                   "vocabulary file); save one next to the model (`tokenizer.save_pretrained(folder)`)")
    return found, folder


def _build_model(resolved, task: str, label_names: list[str], *, random_init: bool):
    """The classifier with a head of `len(label_names)` classes, and what happened to the head."""
    num_labels = len(label_names)
    if resolved.library == "timm":
        from ..adapters.timm import load_config

        timm_config = load_config(resolved.folder)
        before = timm_config.num_classes
        if random_init:
            model = timm_config.create(num_classes=num_labels)
        else:
            import timm

            model = timm.create_model(f"local-dir:{resolved.folder}", pretrained=True, num_classes=num_labels)
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": num_labels, "label_names": list(label_names)}
        return model, _head_note(before, num_labels, random_init, kept_class=True)
    import transformers

    auto = (transformers.AutoModelForImageClassification if task == "image"
            else transformers.AutoModelForSequenceClassification)
    id2label = dict(enumerate(label_names))
    labels = dict(id2label=id2label, label2id={name: index for index, name in id2label.items()})
    config_dict = resolved.config()
    before = config_dict.get("num_labels", len(config_dict.get("id2label") or {}) or None)
    suffix = "ForImageClassification" if task == "image" else "ForSequenceClassification"
    has_head = any(name.endswith(suffix) for name in config_dict.get("architectures") or [])
    if random_init:
        config = transformers.AutoConfig.from_pretrained(str(resolved.folder), **labels)
        model = auto.from_config(config)
    else:
        model = auto.from_pretrained(str(resolved.folder), ignore_mismatched_sizes=True, **labels)
    return model, _head_note(before, num_labels, random_init, kept_class=has_head)


def _head_note(before: int | None, num_labels: int, random_init: bool, *, kept_class: bool) -> str:
    if random_init:
        return f"new {num_labels}-class head (random initialization, like the rest of the model)"
    if kept_class and before == num_labels:
        return f"the model's {num_labels}-class head, kept"
    if kept_class and before:
        return f"new {num_labels}-class head (the model's head has {before} classes)"
    return f"new {num_labels}-class head (the model has none)"


def _batches(model, resolved, folder: Path, spec: DataSpec, task: str, *, batch_size: int, seed: int, device: str,
             max_length: int | None):
    """The batch stream for `gradinit_` and the preprocessing notes."""
    if task == "text":
        prepare, notes = _text_preparation(resolved, folder, model, spec, max_length)
    else:
        prepare, notes = _image_preparation(resolved, folder, model, spec)
    tuples = resolved.library == "timm"
    return _BatchStream(spec, prepare, batch_size=batch_size, seed=seed, device=device, tuples=tuples), notes


def _image_preparation(resolved, folder: Path, model, spec: DataSpec):
    import torch

    column = spec.inputs[0]
    if resolved.library == "timm":
        from timm.data import create_transform, resolve_data_config

        data_config = resolve_data_config(model=model)
        transform = create_transform(**data_config, is_training=False)
        channels = data_config["input_size"][0]
        mode = "L" if channels == 1 else "RGB"

        def prepare(rows):
            return {"pixel_values": torch.stack([transform(image.convert(mode)) for image in rows[column]])}

        described = ", ".join(f"{key} {value}" for key, value in data_config.items())
        return prepare, {"timm data config": f"`resolve_data_config` + `create_transform` (eval): {described}",
                         "images": f"column `{column}`, converted to {mode}"}
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(folder))
    channels = getattr(model.config, "num_channels", 3)
    mode = "L" if channels == 1 else "RGB"

    def prepare(rows):
        return {"pixel_values": processor(images=[image.convert(mode) for image in rows[column]],
                                          return_tensors="pt")["pixel_values"]}

    return prepare, {"image processor": f"the model's `{type(processor).__name__}` (copied)",
                     "images": f"column `{column}`, converted to {mode}"}


def _text_preparation(resolved, folder: Path, model, spec: DataSpec, max_length: int | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        raise GradInitCommandError(f"the tokenizer of {resolved.reference} has no padding token, so batches cannot be "
                                   "padded; give it one (`tokenizer.pad_token = ...`) and save it with the model")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    limits = [value for value in (getattr(tokenizer, "model_max_length", None),
                                  getattr(model.config, "max_position_embeddings", None))
              if isinstance(value, int) and 0 < value < 1_000_000]
    length = max_length or (min(limits) if limits else 512)
    columns = spec.inputs

    def prepare(rows):
        texts = [rows[name] for name in columns]
        return dict(tokenizer(*texts, padding=True, truncation=True, max_length=length, return_tensors="pt"))

    return prepare, {"tokenizer": f"the model's `{type(tokenizer).__name__}` (copied), truncation to {length} tokens, "
                                  "padding to the longest text of each batch",
                     "texts": ", ".join(f"`{name}`" for name in columns) + (" (pairs)" if len(columns) == 2 else "")}


class _BatchStream:
    """Endless batches of `batch_size`: the examples in a fresh seeded order every pass, passes joined, so every
    batch is full and no example is dropped (a batch may straddle two passes)."""

    def __init__(self, spec: DataSpec, prepare, *, batch_size: int, seed: int, device: str, tuples: bool):
        self.spec, self.prepare, self.batch_size, self.seed = spec, prepare, batch_size, seed
        self.device, self.tuples = device, tuples

    def indices(self) -> Iterator[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        pending: list[int] = []
        while True:
            pending += torch.randperm(len(self.spec), generator=generator).tolist()
            while len(pending) >= self.batch_size:
                yield pending[:self.batch_size]
                pending = pending[self.batch_size:]

    def __iter__(self):
        import torch

        spec = self.spec
        for chosen in self.indices():
            rows = spec.dataset[chosen]
            batch = self.prepare(rows)
            labels = rows[spec.label_column]
            if spec.label_ids is not None:
                labels = [spec.label_ids[label] for label in labels]
            labels = torch.as_tensor(labels, dtype=torch.long)
            batch = {key: value.to(self.device) for key, value in batch.items()}
            labels = labels.to(self.device)
            if self.tuples:
                yield batch["pixel_values"], labels
            else:
                yield {**batch, "labels": labels}


def _license(folder: Path) -> dict[str, str]:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data.to_dict()
    except (ValueError, OSError):
        return {}
    return {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}


# ------------------------------------------------------------------------------------------------------ save


def save_run(run: GradInitRun, output_dir: str | os.PathLike, *, overwrite: bool = False,
             repo_id: str | None = None) -> Path:
    """Save the initialized model, its preprocessing files, `gradinit_scales.json` and the model card.

    Written to a staging folder and moved into place when complete (`hf_regtools._io.atomic_directory`), so a
    failure never leaves a half-written output. transformers models load with `from_pretrained`; timm models with
    `timm.create_model("local-dir:...")` / `"hf-hub:..."` and with transformers' `AutoModelForImageClassification`
    (`TimmWrapper`).

    Args:
        run (`GradInitRun`): what `run_gradinit` returned.
        output_dir (`str` or `os.PathLike`): the folder to write.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder.
        repo_id (`str`, *optional*): the Hub repo the folder will be pushed to; the card's usage section names it.
    """
    from .._io import atomic_directory
    from ..adapters import save_model

    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        save_model(run.model, staging)
        for path in run.preprocessing_files:
            shutil.copyfile(path, staging / path.name)
        run.report.save_json(staging / SCALES_FILE)
        model_card(run, repo_id=repo_id).save(staging / "README.md")
    return output_dir


def model_card(run: GradInitRun, *, repo_id: str | None = None):
    """The `ModelCard` of a GradInit run: `base_model`, library, task tags, data, measured counts, GradInit settings
    (through `hf_regtools.hub.add_techniques_to_card`) and usage.

    Args:
        run (`GradInitRun`): what `run_gradinit` returned.
        repo_id (`str`, *optional*): the model's Hub repo, used in the usage section (else a placeholder).
    """
    from .. import hub
    from .._registry import get_technique

    info = get_technique("gradinit")
    pipeline = "image-classification" if run.task == "image" else "text-classification"
    card_data: dict[str, Any] = dict(library_name=run.library, tags=["gradinit", pipeline], pipeline_tag=pipeline,
                                     **run.license)
    if run.model_on_hub:
        card_data["base_model"] = run.model_reference
    scales = run.report.scales
    values = sorted(scales.values())
    extremes = sorted(scales.items(), key=lambda item: item[1])
    shown = dict(extremes[:3] + extremes[-3:]) if len(extremes) > 6 else dict(extremes)
    card = hub.build_model_card(
        "gradinit", card_data=card_data, model=run.model_reference, model_revision=run.model_revision,
        model_on_hub=run.model_on_hub, random_init=run.random_init, library=run.library, task=run.task,
        architecture=type(run.model).__name__, parameters=f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M",
        head=run.head, data=run.data.description, inputs=", ".join(f"`{name}`" for name in run.data.inputs),
        label_column=run.data.label_column, num_labels=run.num_labels, batch_size=run.batch_size, seed=run.seed, device=run.device,
        iterations=run.config.iterations, objective=run.config.objective,
        constraint_steps=run.report.constraint_steps, objective_steps=run.report.objective_steps,
        tensors=len(values), scale_min=_number(values[0]) if values else None,
        scale_median=_number(values[len(values) // 2]) if values else None,
        scale_max=_number(values[-1]) if values else None, extremes={key: _number(value) for key, value in shown.items()},
        scales_file=SCALES_FILE, preprocessing=run.preprocessing, license=run.license.get("license"),
        image_processor=any(path.name == IMAGE_PROCESSOR_FILE for path in run.preprocessing_files),
        repo_id=repo_id, paper=info.paper, arxiv=info.arxiv, code_repo=info.code_repo,
    )
    return hub.add_techniques_to_card(card, [hub.TechniqueUse("gradinit", run.config.to_dict())])


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


# ---------------------------------------------------------------------------------------------------- the CLI


def _disable_progress_bars() -> None:
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def main(args: argparse.Namespace, *, output_exists) -> int:
    """The body of `hf-regtools gradinit` (called by `hf_regtools.cli`); `output_exists(path)` builds the error for an
    existing output."""
    from .._io import check_output_dir

    try:
        output = check_output_dir(args.output, overwrite=args.overwrite)
    except FileExistsError as error:
        raise output_exists(args.output) from error
    config = config_from_args(args)
    data_kind(args.data)
    if args.no_progress:
        _disable_progress_bars()
    push_id = None
    if args.push_to_hub:
        from ..hub import push_target

        push_id = push_target(args.push_to_hub)
    run = run_gradinit(args.model, args.data, config=config, revision=args.revision, library=args.library,
                       num_labels=args.num_labels, random_init=args.random_init, split=args.split,
                       image_column=args.image_column, text_column=args.text_column, label_column=args.label_column,
                       max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, device=args.device,
                       progress=not args.no_progress)
    from ..cli import save_and_push

    return save_and_push(run, output, args, push_id=push_id, summary=run.summary(),
                         commit_message=f"GradInit of {run.model_reference}")


__all__ = ["DataSpec", "GradInitCommandError", "GradInitRun", "add_arguments", "config_from_args", "data_kind",
           "load_data", "model_card", "run_gradinit", "save_run", "task_of"]
