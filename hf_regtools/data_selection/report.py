"""The selection report (JSON and a PNG bar chart) and the selected subset of the source dataset."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DataSelectionReport", "class_label_names", "select_pretraining_subset"]


@dataclass
class DataSelectionReport:
    """What was selected, from what, and how.

    Attributes:
        source (`str`): the source (pre-training) dataset, e.g. a Hub id or a local path.
        target (`str`): the target dataset.
        backbone (`str`): the model whose features gave the prototypes.
        label_column (`str`): the source dataset's label column.
        class_ids (`list[int]`): the selected source label values, best first.
        class_names (`list[str]`, *optional*): their names, where the dataset has them (a `ClassLabel` feature).
        weights (`list[float]`): their transported masses `w_j`, in the same order.
        target_marginal_error (`float`): `max_k |sum_j T_jk - 1|` of the plan.
        num_examples (`int`): the number of source examples of the selected classes.
        settings (`dict`): the selection settings (`p_m`, `reg`, `reg_m`, `n_classes`, ...), JSON values.
    """

    source: str
    target: str
    backbone: str
    label_column: str
    class_ids: list[int]
    class_names: list[str] | None
    weights: list[float]
    target_marginal_error: float
    num_examples: int
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.class_ids = [_label_value(i, "class_ids") for i in self.class_ids]
        self.weights = [float(w) for w in self.weights]
        if len(self.weights) != len(self.class_ids):
            raise ValueError(f"DataSelectionReport: {len(self.class_ids)} class_ids but {len(self.weights)} weights; give "
                             "one weight per class")
        if self.class_names is not None:
            self.class_names = [str(name) for name in self.class_names]
            if len(self.class_names) != len(self.class_ids):
                raise ValueError(f"DataSelectionReport: {len(self.class_ids)} class_ids but {len(self.class_names)} "
                                 "class_names; give one name per class or None")
        self.target_marginal_error = float(self.target_marginal_error)
        self.num_examples = int(self.num_examples)
        self.settings = json.loads(json.dumps(self.settings, default=_json_default))

    def to_dict(self) -> dict:
        """The report as JSON-serialisable values."""
        return dataclasses.asdict(self)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report to `path` as JSON (atomically: the file is complete or absent). Returns the path."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(staging, 0o666 & ~_umask())
            os.replace(staging, path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DataSelectionReport:
        """Read a report written by `save_json`.

        Raises:
            `ValueError`: the file is not a selection report (the message names the missing or unknown keys).
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            keys = set(data) if isinstance(data, dict) else set()
            raise ValueError(f"{path} is not a selection report: missing keys {sorted(names - keys)}, unknown keys "
                             f"{sorted(keys - names)}")
        return cls(**data)

    def plot(self, path: str | os.PathLike, top: int = 20) -> Path:
        """Draw the `top` selected classes' weights as a horizontal bar chart (PNG). Returns the path."""
        from matplotlib.figure import Figure

        if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 1:
            raise ValueError(f"top must be a positive integer, got {top!r}")
        count = min(int(top), len(self.class_ids))
        labels = [f"{name} ({i})" if self.class_names else str(i)
                  for i, name in zip(self.class_ids[:count], (self.class_names or self.class_ids)[:count])]
        figure = Figure(figsize=(7.0, 1.2 + 0.28 * max(count, 1)))
        axis = figure.add_subplot()
        axis.barh(range(count), self.weights[:count], color="tab:blue")
        axis.set_yticks(range(count), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("transported mass w (target classes receive ~1 each)")
        axis.set_title(f"top {count} of {len(self.class_ids)} {self.source} classes for {self.target}\n"
                       f"({self.backbone}; target marginal error {self.target_marginal_error:.2g})", fontsize=9)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=110, format="png")
        return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"DataSelectionReport.settings: {value!r} ({type(value).__name__}) is not a JSON value")


def _label_value(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what}: label values are integers, got {value!r}")
    return int(value)


def class_label_names(features, label_column: str, class_ids: Sequence[int]) -> list[str] | None:
    """The names of `class_ids` when `features[label_column]` is a `datasets.ClassLabel`, else None.

    Args:
        features (`datasets.Features`, a `Dataset` or an `IterableDataset`): where the label feature is read.
        label_column (`str`): the label column.
        class_ids (`Sequence[int]`): label values.
    """
    import datasets

    features = getattr(features, "features", features)
    feature = (features or {}).get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        return None
    return [feature.int2str(_label_value(i, "class_ids")) for i in class_ids]


def _keep_rows(labels, selected: np.ndarray) -> np.ndarray:
    return np.isin(np.asarray(labels), selected)


class _StreamError(ValueError):
    pass


def _stream_rows(stream, label_column: str, selected: tuple[int, ...], kept: dict):
    selected = set(selected)
    for row in stream:
        if label_column not in row:
            raise _StreamError(f"the source stream has no label column {label_column!r} (columns: {sorted(row)}); "
                               "pass label_column")
        if row[label_column] in selected:
            kept["rows"] += 1
            yield row


def _missing_classes_error(missing: list[int], label_column: str) -> ValueError:
    return ValueError(f"selected classes {missing[:10]} have no example in the source dataset's column "
                      f"{label_column!r}; select classes from the same source the prototypes were computed on")


def _streamed_subset(stream, label_column: str, selected: list[int]):
    import datasets

    kept = {"rows": 0}
    undecoded = stream.decode(False) if stream.features is not None and hasattr(stream, "decode") else stream
    try:
        return datasets.Dataset.from_generator(_stream_rows, features=stream.features,
                                               gen_kwargs={"stream": undecoded, "label_column": label_column,
                                                           "selected": tuple(selected), "kept": kept})
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, _StreamError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ValueError(str(cause)) from None
        if not kept["rows"]:
            raise _missing_classes_error(selected, label_column) from error
        raise


def select_pretraining_subset(source_dataset, class_ids: Sequence[int], label_column: str = "label", *,
                              seed: int | None = None):
    """Every example of the selected source classes, as a `datasets.Dataset`.

    A map-style `Dataset` is filtered (reading only the label column); an `IterableDataset` (e.g. a Hub dataset loaded
    with `streaming=True`) is read in one streamed pass, undecoded, keeping only the selected rows, which are written
    to a `Dataset` in the `datasets` cache. The order is the source's, or a shuffle with `seed` when one is given.

    Args:
        source_dataset (`datasets.Dataset` or `datasets.IterableDataset`): the source (pre-training) data.
        class_ids (`Sequence[int]`): the selected label values (`DataSelectionReport.class_ids`).
        label_column (`str`, *optional*, defaults to `"label"`): the label column.
        seed (`int`, *optional*): shuffle the result with this seed.

    Returns:
        `datasets.Dataset`.

    Raises:
        `ValueError`: no class ids, the label column is missing, a label value is outside a `ClassLabel`'s range, or a
            selected class has no example in the source.
        `TypeError`: `source_dataset` is not a `Dataset` or `IterableDataset` (a `DatasetDict`: pick a split).
    """
    import datasets

    if isinstance(source_dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"source_dataset is a {type(source_dataset).__name__} with splits {list(source_dataset)}; pass "
                        "one split, e.g. source_dataset['train']")
    if not isinstance(source_dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"source_dataset must be a datasets.Dataset or IterableDataset, got "
                        f"{type(source_dataset).__name__}")
    selected = sorted({_label_value(i, "class_ids") for i in class_ids})
    if not selected:
        raise ValueError("class_ids is empty; select at least one source class")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    columns = source_dataset.column_names
    if columns is not None and label_column not in columns:
        raise ValueError(f"the source dataset has no label column {label_column!r} (columns: {columns}); pass "
                         "label_column")
    feature = (source_dataset.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        outside = [i for i in selected if not 0 <= i < feature.num_classes]
        if outside:
            raise ValueError(f"class_ids {outside[:10]} are outside the {feature.num_classes} classes of the "
                             f"ClassLabel column {label_column!r}")

    if isinstance(source_dataset, datasets.Dataset):
        subset = source_dataset.filter(_keep_rows, batched=True, input_columns=label_column,
                                       fn_kwargs={"selected": np.asarray(selected)},
                                       desc="Selecting source classes")
    else:
        subset = _streamed_subset(source_dataset, label_column, selected)
    found = set(np.unique(np.asarray(subset.select_columns([label_column]).with_format("numpy")[:][label_column]))
                .tolist()) if len(subset) else set()
    missing = [i for i in selected if i not in found]
    if missing:
        raise _missing_classes_error(missing, label_column)
    return subset.shuffle(seed=seed) if seed is not None else subset
