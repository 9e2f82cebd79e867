"""Class prototypes: the mean feature of each class of a dataset under a pretrained backbone.

The feature is what the classifier head of the backbone reads (`hf_regtools.adapters.heads.pooled_features`: the
pooled backbone output), or what the user's `feature` callable returns (e.g. a projection head, as the spec's MoCo
setting uses). The data is streamed batch by batch and only running per-class sums and counts are kept, so a source
the size of ImageNet is never held in memory; under several processes (`accelerate launch`, `torchrun`) every rank
reads its shard (`datasets.distributed.split_dataset_by_node`) and the sums and counts are reduced, so every rank
returns the same prototypes. With `cache_dir`, the prototypes are stored (safetensors, plus a JSON of the labels and
names) under a key of the backbone, the dataset and the preprocessing, and a re-run loads them without running or
even loading the backbone.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images", "picture")
CACHE_VERSION = 1


@dataclass
class ClassPrototypes:
    """Class-mean features of a dataset.

    Attributes:
        prototypes (`torch.Tensor`): `(K, d)` float32, row `i` the mean feature of class `labels[i]` (not normalised).
        labels (`list[int]`): the label value of each row, sorted.
        counts (`list[int]`): examples per row.
        names (`list[str]`, *optional*): the class name of each row, from the dataset's `ClassLabel` feature.
    """

    prototypes: torch.Tensor
    labels: list[int]
    counts: list[int]
    names: list[str] | None = None

    @property
    def feature_dim(self) -> int:
        return int(self.prototypes.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
        """Write `path` (safetensors: prototypes, labels, counts; names in its metadata) and `path` with suffix
        `.json` (labels, names, counts, for people), each atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        description = {"labels": self.labels, "names": self.names, "counts": self.counts, **(metadata or {})}
        _atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(description, indent=2)))
        tensors = {"prototypes": self.prototypes.detach().cpu().float().contiguous(),
                   "labels": torch.tensor(self.labels, dtype=torch.int64),
                   "counts": torch.tensor(self.counts, dtype=torch.int64)}
        header = {"names": json.dumps(self.names), **(metadata or {})}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassPrototypes:
        """Read prototypes written by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as file:
            names = json.loads((file.metadata() or {}).get("names", "null"))
            return cls(file.get_tensor("prototypes"), file.get_tensor("labels").tolist(),
                       file.get_tensor("counts").tolist(), names)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ backbone


class Backbone:
    """A backbone given as a Hub id, a local folder or a module, loaded at most once and only when features are
    computed (a cache hit never loads it).

    Attributes:
        name (`str`): how reports and cards name it (the Hub id, the folder, or the module's family).
        identity (`str`): the cache key of its weights: `hub:<repo>@<commit>`, `folder:<hash of its files>` or
            `module:<class>:<hash of the state dict>`.
        library (`str`, *optional*): `"timm"` or `"transformers"` (`None` for other modules).
    """

    def __init__(self, backbone: str | os.PathLike | nn.Module, *, revision: str | None = None):
        self._model = None
        self._default_transform = None
        self.folder = None
        if isinstance(backbone, nn.Module):
            from ..adapters import describe_model

            self._model = backbone
            self.name = describe_model(backbone)
            self._identity = None
            self.library = _library_of_module(backbone)
            self.reference = None
            self.on_hub = False
            return
        if not isinstance(backbone, (str, os.PathLike)):
            raise TypeError(f"backbone must be a Hub id, a folder or an nn.Module, got {type(backbone).__name__}")
        from .. import hub

        resolved = hub.resolve_model(backbone, revision=revision, weights=False)
        self.reference, self.revision, self.library = str(backbone), revision, resolved.library
        self.on_hub = resolved.repo_id is not None
        if self.on_hub:
            self.name = resolved.repo_id
            self._identity = f"hub:{resolved.repo_id}@{resolved.revision}"
        else:
            self.folder = resolved.folder
            self.name = str(backbone)
            self._identity = f"folder:{_folder_hash(resolved.folder)}"

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = f"module:{type(self._model).__qualname__}:{state_dict_hash(self._model)}"
        return self._identity

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> nn.Module:
        """The module (loaded with `hub.load_model` on first use)."""
        if self._model is None:
            from .. import hub

            self._model = hub.load_model(self.reference, revision=self.revision)
        return self._model

    def default_transform(self) -> Callable:
        """The backbone's own preprocessing: timm's eval transform of its data config (Resize, CenterCrop, normalise),
        or the transformers image processor saved with it.

        Raises:
            `ValueError`: a transformers module without an image processor, or a module of neither library.
        """
        if self._default_transform is None:
            self._default_transform = _default_transform(self)
        return self._default_transform

    def preprocessing_key(self, transform: Callable | None) -> str:
        """The cache key of the preprocessing: the user's `transform`, else the default one (for Hub and folder
        backbones their files are the key, so the model need not be loaded)."""
        if transform is not None:
            return "user:" + describe_callable(transform)
        if self.loaded:
            return "default:" + describe_callable(self.default_transform())
        return "default"


def _library_of_module(module: nn.Module) -> str | None:
    from ..adapters import UnsupportedModelError
    from ..adapters import _library_of_class
    from ..adapters.heads import library_model

    try:
        return _library_of_class(library_model(module)[1])
    except UnsupportedModelError:
        return None


def _default_transform(backbone: Backbone) -> Callable:
    from ..adapters.heads import library_model

    model = backbone.model
    if backbone.library == "timm":
        import timm.data

        _, inner = library_model(model)
        config = timm.data.resolve_model_data_config(inner)
        return _RGB(timm.data.create_transform(**config, is_training=False))
    if backbone.library == "transformers":
        from transformers import AutoImageProcessor

        sources = [str(backbone.folder)] if backbone.folder else [backbone.reference] if backbone.reference else []
        sources += [getattr(getattr(model, "config", None), "_name_or_path", None) or ""]
        for source in filter(None, sources):
            try:
                return _Processor(AutoImageProcessor.from_pretrained(source, revision=backbone.revision))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        raise ValueError(f"{backbone.name} has no image processor (preprocessor_config.json); save one next to the "
                         "model, or pass transform= (a callable from an image to a pixel tensor)")
    raise ValueError(f"{backbone.name} is neither a timm nor a transformers model, so it has no default "
                     "preprocessing; pass transform= (a callable from an image to a pixel tensor)")


class _RGB:
    """timm's eval transform, after converting images to RGB (as the official `ImageFolder` loader does)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"RGB+{self.transform!r}"


class _Processor:
    """A transformers image processor applied to one image at a time, after converting it to RGB."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"RGB+{type(self.processor).__name__}{self.processor.to_json_string()}"


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            digest.update(str(path.relative_to(folder)).encode())
            with path.open("rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def describe_callable(obj: Any) -> str:
    """A stable description of a transform or feature callable for cache keys: an image processor's JSON, a repr
    without memory addresses (torchvision / timm transforms), else the qualified name and a hash of the source code
    (and of the state dict for modules)."""
    if hasattr(obj, "to_json_string"):
        return obj.to_json_string()
    if isinstance(obj, nn.Module):
        return f"{type(obj).__qualname__}:{state_dict_hash(obj)}"
    text = repr(obj)
    if " at 0x" not in text:
        return text
    function = obj if inspect.isroutine(obj) else type(obj)
    try:
        source = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError):
        source = "nosource"
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(obj).__name__)}:{source}"


# -------------------------------------------------------------------------------------------------------- data


def dataset_fingerprint(dataset: Any) -> str | None:
    """A stable identity of a dataset for cache keys: a map-style `datasets.Dataset`'s `_fingerprint`; for an
    `IterableDataset` (streaming) its name, config, split, version, data files (local ones with size and modification
    time) and the chain of operations on it; `None` when there is nothing stable to name it by."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset._fingerprint
    if not isinstance(dataset, datasets.IterableDataset):
        return None
    steps, files, node = [], None, dataset._ex_iterable
    while node is not None:
        steps.append(type(node).__name__)
        kwargs = getattr(node, "kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("files"):
            files = [_file_identity(path) for path in _flatten(kwargs["files"])]
        node = getattr(node, "ex_iterable", None)
    if not files:
        return None
    info = dataset.info
    description = {"name": info.dataset_name, "config": info.config_name, "split": str(dataset.split),
                   "version": str(info.version), "files": files, "steps": steps}
    return "streaming:" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _flatten(files) -> Iterable[str]:
    for item in files if isinstance(files, (list, tuple)) else [files]:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield str(item)


def _file_identity(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return path
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass
class DataView:
    """A dataset checked for class-prototype extraction (its columns and label space), before any feature is computed.

    Attributes:
        dataset: the dataset, restricted to the image and label columns where it is a `datasets` object.
        image_column (`str`), label_column (`str`): the columns read.
        label_names (`list[str]`, *optional*): the `ClassLabel` names (index = label value).
        streaming (`bool`): an `IterableDataset` (never held in memory).
        fingerprint (`str`, *optional*): see `dataset_fingerprint`.
    """

    dataset: Any
    image_column: str
    label_column: str
    label_names: list[str] | None
    streaming: bool
    fingerprint: str | None
    is_image: bool
    name: str

    @property
    def num_classes(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None


def check_dataset(dataset: Any, label_column: str = "label", *, image_column: str | None = None,
                  name: str = "dataset", skip_empty_classes: bool = False) -> DataView:
    """Check the columns and labels of `dataset` without computing features.

    A map-style dataset with a `ClassLabel` label column is checked for classes without examples and unlabelled
    (-1) examples here, from the label column alone; a streaming one while it is read.

    Raises:
        `ValueError`: no such label or image column (the message lists the columns), labels that are neither
            integers nor a `ClassLabel`, a class without examples, unlabelled examples.
    """
    import datasets

    is_datasets = isinstance(dataset, (datasets.Dataset, datasets.IterableDataset))
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise ValueError(f"{name} is a dataset dict with splits {', '.join(dataset)}; pass one split, e.g. "
                         f"dataset[{next(iter(dataset))!r}]")
    features = dataset.features if is_datasets else None
    if features is None and isinstance(dataset, datasets.IterableDataset):
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ValueError(f"{name} is empty")
        features = datasets.Features({key: datasets.Value("null") for key in first})
        columns = list(first)
    else:
        columns = list(features) if features is not None else None
    if columns is not None:
        if label_column not in columns:
            raise ValueError(f"{name} has no label column {label_column!r}; its columns are {', '.join(columns)}. "
                             "Name the label column with label_column= (--label-column / --source-label-column)")
        if image_column is None:
            images = [c for c in columns if isinstance(features[c], datasets.Image)]
            image_column = images[0] if len(images) == 1 else next(
                (c for c in IMAGE_COLUMNS if c in columns and c != label_column), None)
            if image_column is None:
                raise ValueError(f"{name} has no image column; its columns are {', '.join(columns)}. Name it with "
                                 "image_column=")
        elif image_column not in columns:
            raise ValueError(f"{name} has no image column {image_column!r}; its columns are {', '.join(columns)}")
    image_column = image_column or "image"
    label_feature = features[label_column] if features is not None else None
    names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    dtype = getattr(label_feature, "dtype", None)
    if label_feature is not None and names is None and dtype not in (None, "null") and not (
            dtype.startswith("int") or dtype.startswith("uint")):
        raise ValueError(f"{name}: the label column {label_column!r} holds {type(label_feature).__name__}({dtype}); "
                         f"class labels must be integers or a ClassLabel (encode them with "
                         f"dataset.class_encode_column({label_column!r}))")
    is_image = features is not None and isinstance(features.get(image_column), datasets.Image)
    streaming = isinstance(dataset, datasets.IterableDataset)
    if isinstance(dataset, datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty")
        values = set(dataset.unique(label_column))
        _check_labels(values, names, name, label_column, skip_empty_classes=skip_empty_classes)
    fingerprint = dataset_fingerprint(dataset)
    if is_datasets:
        dataset = dataset.select_columns([image_column, label_column])
        dataset = dataset.with_format(None if is_image or features.get(image_column) is None else "torch")
    return DataView(dataset, image_column, label_column, names, streaming, fingerprint, is_image, name)


def _check_labels(values: set[int], names: list[str] | None, name: str, label_column: str, *,
                  skip_empty_classes: bool) -> None:
    if any(value is None or value < 0 for value in values):
        raise ValueError(f"{name} has unlabelled examples (label -1 or none in {label_column!r}); class prototypes "
                         "need labels: filter them out or choose a labelled split")
    if names is not None:
        outside = sorted(value for value in values if value >= len(names))
        if outside:
            raise ValueError(f"{name}: labels {outside[:5]} are outside its ClassLabel of {len(names)} names")
        if not skip_empty_classes:
            empty = [names[index] for index in range(len(names)) if index not in values]
            if empty:
                raise ValueError(f"{name}: class {empty[0]!r}{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}"
                                 f" of its ClassLabel has no examples, so it has no prototype; drop it from the "
                                 "label feature, or pass skip_empty_classes=True")


# ---------------------------------------------------------------------------------------------------- extraction


class _Collate:
    def __init__(self, image_column: str, label_column: str, transform: Callable | None):
        self.image_column, self.label_column, self.transform = image_column, label_column, transform

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [row[self.image_column] for row in rows]
        if self.transform is not None:
            images = [self.transform(image) for image in images]
        pixels = torch.stack([torch.as_tensor(image) for image in images])
        labels = [-1 if row[self.label_column] is None else int(row[self.label_column]) for row in rows]
        return pixels, torch.tensor(labels, dtype=torch.int64)


class _ColumnBatches:
    """Batches of an array column read from Arrow slices (no per-row conversion), for preprocessed pixel values."""

    def __init__(self, dataset, batch_size: int, image_column: str, label_column: str):
        self.dataset, self.batch_size = dataset.with_format("arrow"), batch_size
        self.image_column, self.label_column = image_column, label_column

    def __iter__(self):
        for table in self.dataset.iter(batch_size=self.batch_size):
            labels = table.column(self.label_column).to_pylist()
            pixels = _arrow_tensor(table.column(self.image_column), len(labels))
            yield pixels, torch.tensor([-1 if value is None else int(value) for value in labels], dtype=torch.int64)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)


def _arrow_tensor(column, rows: int) -> torch.Tensor:
    """A `(rows, *shape)` tensor of an Arrow column of equally shaped nested lists (or a datasets ArrayND column)."""
    import numpy as np
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column.type, pa.ExtensionType):
        return torch.from_numpy(np.array(column.to_numpy(zero_copy_only=False)))
    shape = np.asarray(column[0].as_py()).shape
    values = column
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
            pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if flat.size != rows * math.prod(shape):
        raise ValueError(f"the rows of the input column have different shapes (the first is {shape}); pass transform= "
                         "that gives tensors of one shape")
    return torch.from_numpy(np.array(flat.reshape(rows, *shape)))


class Extraction:
    """The class-prototype computation of one dataset under one backbone: its cache entry, a one-example probe of
    the feature width, and the streamed run. `class_prototypes` is `Extraction(...).prototypes()`;
    `select_pretraining_data` probes target and source before extracting either."""

    def __init__(self, backbone: Backbone, view: DataView, *, batch_size: int = 64, transform: Callable | None = None,
                 feature: Callable | None = None, cache_dir: str | os.PathLike | None = None,
                 dataset_id: str | None = None, num_workers: int = 0, device: str | torch.device | None = None,
                 skip_empty_classes: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.backbone, self.view, self.batch_size = backbone, view, batch_size
        self.transform, self.feature, self.num_workers = transform, feature, num_workers
        self.device, self.skip_empty_classes = device, skip_empty_classes
        self.cache_path = None
        fingerprint = dataset_id or view.fingerprint
        if cache_dir is not None and fingerprint is None:
            logger.warning("%s has no stable identity (not a datasets.Dataset or a streaming dataset of data files); "
                           "its prototypes are not cached: pass dataset_id= to cache them", view.name)
        elif cache_dir is not None:
            key = {"version": CACHE_VERSION, "backbone": backbone.identity, "dataset": fingerprint,
                   "preprocessing": backbone.preprocessing_key(transform),
                   "feature": "pooled_features" if feature is None else describe_callable(feature),
                   "image_column": view.image_column, "label_column": view.label_column,
                   "skip_empty_classes": skip_empty_classes}
            self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            self.cache_path = Path(cache_dir) / f"prototypes-{self.key[:32]}.safetensors"

    def cached(self) -> ClassPrototypes | None:
        """The cached prototypes, if this computation was stored before."""
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.cache_path), "pt") as file:
                if (file.metadata() or {}).get("key") != self.key:
                    return None
            return ClassPrototypes.load(self.cache_path)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring the unreadable cache entry %s (%s)", self.cache_path, error)
            return None

    def _setup(self):
        model = self.backbone.model
        device = torch.device(self.device) if self.device is not None else None
        if device is None:
            from accelerate import PartialState

            state = PartialState()
            parameter = next(model.parameters(), None)
            device = state.device if self.backbone.reference or state.num_processes > 1 or parameter is None \
                else parameter.device
        model.to(device).eval()
        transform = self.transform
        if transform is None and self.view.is_image:
            transform = self.backbone.default_transform()
        return model, device, transform

    def _features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        if self.feature is not None:
            return self.feature(model, pixels)
        from ..adapters.heads import pooled_features

        return pooled_features(model, pixels)

    def _checked(self, features: Any, batch: int) -> torch.Tensor:
        where = f"{self.backbone.name} on {self.view.name}"
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != batch \
                or features.shape[1] == 0 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{where} gives no features: expected a (batch, width) float tensor per batch, got "
                             f"{shape}; pass a backbone with a pooled output or classifier head, or feature=")
        return features

    def probe(self) -> int:
        """The feature width, from the first example (checks that the backbone gives features)."""
        model, device, transform = self._setup()
        rows = self.view.dataset.take(1) if hasattr(self.view.dataset, "take") else self.view.dataset
        first = next(iter(rows), None)
        if first is None:
            raise ValueError(f"{self.view.name} is empty")
        pixels, _ = _Collate(self.view.image_column, self.view.label_column, transform)([first])
        with torch.inference_mode():
            try:
                features = self._features(model, pixels.to(device))
            except (RuntimeError, TypeError, IndexError, AttributeError) as error:
                raise ValueError(f"{self.backbone.name} gives no features on {self.view.name}: its forward on one "
                                 f"example of shape {tuple(pixels.shape)} fails ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:200]}); pass an image backbone, or transform= / "
                                 "feature=") from error
            return int(self._checked(features, 1).shape[1])

    def prototypes(self, *, progress: bool = True) -> ClassPrototypes:
        """The cached prototypes, else computed (and stored when a cache folder is set)."""
        cached = self.cached()
        if cached is not None:
            logger.info("class prototypes of %s loaded from %s", self.view.name, self.cache_path)
            return cached
        result = self._run(progress=progress)
        if self.cache_path is not None:
            from accelerate import PartialState

            if PartialState().is_main_process:
                result.save(self.cache_path, metadata={"key": self.key, "backbone": self.backbone.identity,
                                                       "dataset": self.view.name})
        return result

    def _run(self, *, progress: bool) -> ClassPrototypes:
        from accelerate import PartialState
        from tqdm.auto import tqdm

        state = PartialState()
        model, device, transform = self._setup()
        dataset = self.view.dataset
        if state.num_processes > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=state.process_index, world_size=state.num_processes)
        loader = self._batches(dataset, transform, pin_memory=device.type == "cuda")
        total = _num_batches(dataset, self.batch_size)
        known = self.view.num_classes
        accumulate = torch.float32 if device.type == "mps" else torch.float64
        sums = counts = None
        rows_of: dict[int, int] = {}
        seen: set[int] = set()
        bar = tqdm(loader, total=total, desc=f"features of {self.view.name}", unit="batch",
                   disable=not progress or not state.is_main_process)
        with torch.inference_mode():
            for pixels, labels in bar:
                values = labels.tolist()
                new = set(values) - seen
                if new:
                    _check_labels(new, self.view.label_names, self.view.name, self.view.label_column,
                                  skip_empty_classes=True)
                    seen |= new
                features = self._checked(self._features(model, pixels.to(device, non_blocking=True)), len(values))
                if sums is None:
                    size = known or 0
                    sums = torch.zeros(size, features.shape[1], dtype=accumulate, device=device)
                    counts = torch.zeros(size, dtype=torch.int64)
                elif features.shape[1] != sums.shape[1]:
                    raise ValueError(f"{self.backbone.name} gives features of width {features.shape[1]} on one batch "
                                     f"of {self.view.name} and {sums.shape[1]} on another; the inputs must have one "
                                     "size (pass transform= that resizes)")
                if known is not None:
                    rows = labels
                else:
                    for value in new:
                        rows_of[value] = len(rows_of)
                    if len(rows_of) > sums.shape[0]:
                        grow = max(len(rows_of), 2 * sums.shape[0]) - sums.shape[0]
                        sums = torch.cat([sums, sums.new_zeros(grow, sums.shape[1])])
                        counts = torch.cat([counts, counts.new_zeros(grow)])
                    rows = torch.tensor([rows_of[value] for value in values])
                sums.index_add_(0, rows.to(device), features.to(accumulate))
                counts.index_add_(0, rows, torch.ones(len(values), dtype=torch.int64))
        labels = sorted(seen) if known is None else list(range(known))
        width = None if sums is None else sums.shape[1]
        if known is None:
            order = torch.tensor([rows_of[value] for value in labels], dtype=torch.int64)
            sums, counts = (sums[order.to(device)], counts[order]) if sums is not None else (None, None)
        if state.num_processes > 1:
            labels, sums, counts, width = self._reduce(labels, sums, counts, width, device, accumulate)
        if width is None:
            raise ValueError(f"{self.view.name} is empty")
        present = [index for index, count in enumerate(counts.tolist()) if count > 0]
        if known is not None and len(present) < known and not self.skip_empty_classes:
            _check_labels({labels[i] for i in present}, self.view.label_names, self.view.name,
                          self.view.label_column, skip_empty_classes=False)
        sums, counts = sums[torch.tensor(present, device=sums.device)], counts[torch.tensor(present)]
        prototypes = (sums / counts.to(sums).unsqueeze(1)).float().cpu()
        labels = [labels[i] for i in present]
        names = [self.view.label_names[label] for label in labels] if self.view.label_names is not None else None
        return ClassPrototypes(prototypes, labels, counts.tolist(), names)

    def _batches(self, dataset, transform, *, pin_memory: bool):
        """`(pixels, labels)` batches: array columns without a transform are read column-wise (`Dataset.iter`, one
        Arrow slice per batch); images and transforms go through a DataLoader (with `num_workers`)."""
        import datasets

        if transform is None and not self.view.is_image and self.num_workers == 0 and isinstance(
                dataset, (datasets.Dataset, datasets.IterableDataset)):
            return _ColumnBatches(dataset, self.batch_size, self.view.image_column, self.view.label_column)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                                           num_workers=self.num_workers, pin_memory=pin_memory,
                                           collate_fn=_Collate(self.view.image_column, self.view.label_column,
                                                               transform))

    def _reduce(self, labels, sums, counts, width, device, accumulate):
        """Sum the per-rank sums and counts over the ranks, on the union of their labels."""
        from accelerate.utils import gather_object, reduce

        shards = gather_object([(labels, width)])
        widths = {w for _, w in shards if w is not None}
        if len(widths) > 1:
            raise ValueError(f"{self.backbone.name} gives features of widths {sorted(widths)} on different ranks")
        width = widths.pop() if widths else None
        if width is None:
            return labels, sums, counts, None
        union = sorted(set().union(*(set(shard) for shard, _ in shards)))
        index = {value: row for row, value in enumerate(union)}
        dense = torch.zeros(len(union), width + 1, dtype=accumulate, device=device)
        if sums is not None and len(labels):
            rows = torch.tensor([index[value] for value in labels], device=device)
            dense[rows, :width] = sums
            dense[rows, width] = counts.to(device=device, dtype=accumulate)
        dense = reduce(dense, reduction="sum")
        return union, dense[:, :width], dense[:, width].round().long().cpu(), width


def _num_batches(dataset, batch_size: int) -> int | None:
    try:
        return math.ceil(len(dataset) / batch_size)
    except TypeError:
        pass
    info, split = getattr(dataset, "info", None), getattr(dataset, "split", None)
    splits = getattr(info, "splits", None) or {}
    if split is not None and str(split) in splits and splits[str(split)].num_examples:
        return math.ceil(splits[str(split)].num_examples / batch_size)
    return None


def class_prototypes(
    backbone: str | os.PathLike | nn.Module | Backbone,
    dataset: Any,
    label_column: str = "label",
    *,
    image_column: str | None = None,
    batch_size: int = 64,
    transform: Callable | None = None,
    feature: Callable | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    revision: str | None = None,
    dataset_id: str | None = None,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    skip_empty_classes: bool = False,
) -> ClassPrototypes:
    """Class-mean features of `dataset` under a pretrained backbone (in eval mode, without gradients).

    Args:
        backbone (`str`, `os.PathLike` or `nn.Module`): a Hub id (`org/name[@revision]`, timm `hf-hub:` id), a local
            folder (loaded with `hf_regtools.hub.load_model`) or a timm / transformers module (any wrapper too).
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the data; a streaming dataset is read once,
            batch by batch, and never held in memory.
        label_column (`str`, *optional*, defaults to `"label"`): integer or `ClassLabel` labels.
        image_column (`str`, *optional*): default: the only `Image` column, else one of `IMAGE_COLUMNS`. An `Image`
            column goes through `transform` (default: the backbone's own preprocessing, see
            `Backbone.default_transform`); another column (e.g. preprocessed `pixel_values`) is used as it is unless
            `transform` is given.
        batch_size (`int`, *optional*, defaults to 64): examples per forward.
        transform (`Callable`, *optional*): image -> pixel tensor, instead of the backbone's preprocessing.
        feature (`Callable`, *optional*): `feature(model, pixel_values) -> (batch, d)` features, instead of
            `pooled_features(model, pixel_values)` (e.g. the output of a projection head).
        cache_dir (`str` or `os.PathLike`, *optional*): store the result there, keyed by the backbone (Hub repo and
            commit, or a hash of the folder's files or of the module's state dict), the dataset (`dataset_fingerprint`
            or `dataset_id`), the preprocessing and the feature; a re-run loads it without touching the backbone.
        progress (`bool`, *optional*, defaults to `True`): a tqdm progress bar (main process only).
        revision (`str`, *optional*): Hub revision of `backbone`.
        dataset_id (`str`, *optional*): the dataset's cache identity, instead of its fingerprint.
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers for decoding and preprocessing.
        device (`str` or `torch.device`, *optional*): default: the module's device, or Accelerate's device for a
            backbone loaded here (and under several processes).
        skip_empty_classes (`bool`, *optional*, defaults to `False`): leave out `ClassLabel` classes without
            examples instead of raising.

    Returns:
        `ClassPrototypes`: one row per label value present, sorted by label. Under several processes every rank
        reads its shard and returns the same reduced result.

    Raises:
        `ValueError`: missing columns, non-integer labels, a class without examples, unlabelled examples, a backbone
            that gives no features.

    Example:

    ```python
    import datasets
    import torch
    from hf_regtools.data_selection import class_prototypes
    from hf_regtools.testing.tiny_models import timm_resnet

    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(10, 3, 16, 16).numpy(), "label": [0, 1] * 5})
    result = class_prototypes(timm_resnet(), data, progress=False)
    assert result.prototypes.shape == (2, 64) and result.counts == [5, 5]
    ```
    """
    if not isinstance(backbone, Backbone):
        backbone = Backbone(backbone, revision=revision)
    view = check_dataset(dataset, label_column, image_column=image_column, skip_empty_classes=skip_empty_classes)
    extraction = Extraction(backbone, view, batch_size=batch_size, transform=transform, feature=feature,
                            cache_dir=cache_dir, dataset_id=dataset_id, num_workers=num_workers, device=device,
                            skip_empty_classes=skip_empty_classes)
    return extraction.prototypes(progress=progress)
