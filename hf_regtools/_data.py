"""Loading one split of a dataset named on the command line: a `save_to_disk` folder, an image folder, or a dataset
name for `datasets.load_dataset` (the Hub, or its cache with `HF_HUB_OFFLINE=1`). Errors name the command-line option
and say what to pass instead; nothing is downloaded before a path that cannot exist is refused."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its class name."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def data_kind(reference: str | os.PathLike, *, option: str = "--data", error_class: type[Exception] = ValueError) -> str:
    """`"saved"` (save_to_disk), `"imagefolder"` or `"name"` (for `load_dataset`), checked without loading.

    Raises:
        `error_class`: a path that does not exist, or a folder that is neither kind.
    """
    path = Path(reference).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        if _has_images(path):
            return "imagefolder"
        raise error_class(
            f"{option} {reference}: the folder is neither a dataset saved with `save_to_disk` (no dataset_dict.json or "
            "state.json) nor an image folder (no image files in class subfolders)")
    if path.exists():
        raise error_class(f"{option} {reference}: is a file; pass a folder (save_to_disk output or image folder) or a "
                          "dataset name")
    text = str(reference)
    if text.startswith((".", "/", "~")) or text.endswith("/") or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        raise error_class(f"{option} {reference}: no such folder ({path.absolute()})")
    return "name"


def _has_images(folder: Path, limit: int = 10_000) -> bool:
    for count, path in enumerate(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            return True
        if count >= limit:
            return False
    return False


def load_split(reference: str | os.PathLike, *, split: str | None = None, streaming: bool = False,
               option: str = "--data", split_option: str = "--split",
               error_class: type[Exception] = ValueError) -> tuple:
    """One split of `reference` (default `"train"`) and a description of it for logs and cards: `(dataset,
    description)`; an `IterableDataset` when `streaming` (a saved dataset is streamed from its files).

    Raises:
        `error_class`: a missing path, a file, a split that does not exist, or a dataset that cannot be loaded; the
            message names `option` (and `split_option` for the split).
    """
    import datasets

    kind = data_kind(reference, option=option, error_class=error_class)
    if kind == "saved":
        try:
            loaded = datasets.load_from_disk(str(Path(reference).expanduser()))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise error_class(f"{option} {reference}: cannot load the saved dataset ({first_line(error)})") from error
        if isinstance(loaded, datasets.DatasetDict):
            chosen = split or "train"
            if chosen not in loaded:
                raise error_class(f"{option} {reference} has no split {chosen!r}; choose {split_option} among "
                                  f"{', '.join(loaded)}")
            loaded, where = loaded[chosen], f"`{reference}` (saved DatasetDict), split {chosen}"
        else:
            saved_split = str(loaded.split) if loaded.split is not None else None
            if split is not None and split != saved_split:
                raise error_class(f"{option} {reference} is a single saved Dataset"
                                  f"{f' (split {saved_split})' if saved_split else ''}; drop {split_option} {split}")
            where = f"`{reference}` (saved Dataset)"
        return (loaded.to_iterable_dataset() if streaming else loaded), where
    chosen = split or "train"
    args = ("imagefolder",) if kind == "imagefolder" else (str(reference),)
    kwargs = {"data_dir": str(Path(reference).expanduser())} if kind == "imagefolder" else {}
    try:
        dataset = datasets.load_dataset(*args, split=chosen, streaming=streaming, **kwargs)
    except ValueError as error:
        if "split" in str(error).lower():
            raise error_class(f"{option} {reference}: {first_line(error)}; choose another {split_option}") from error
        raise error_class(f"{option} {reference}: cannot load it ({first_line(error)})") from error
    except (OSError, ConnectionError, datasets.exceptions.DatasetsError) as error:
        hint = ("" if kind == "imagefolder" else "; pass a folder (save_to_disk output or image folder), or a dataset "
                "name in the cache (with HF_HUB_OFFLINE=1) or on the Hub")
        raise error_class(f"{option} {reference}: cannot load it ({first_line(error)}){hint}") from error
    label = "image folder" if kind == "imagefolder" else "dataset"
    return dataset, f"`{reference}` ({label}), split {chosen}"
