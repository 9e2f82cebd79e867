"""File-system helpers: outputs appear complete or not at all."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STAGING_KINDS = ("partial", "old")


class OutputError(OSError):
    """The output folder cannot be written; the message names it and the cause."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def check_output_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check, before any work, that `atomic_directory(target, overwrite=overwrite)` can write `target`.

    Returns the absolute path of `target`. Stale staging folders of `target` left by dead processes are removed first.

    Raises:
        `FileExistsError`: `target` is a non-empty folder and `overwrite` is False.
        `OutputError`: `target` is a file, or its folder (or nearest existing parent) is not writable.
    """
    target = Path(os.path.abspath(target))
    remove_stale_staging(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} is a file, not a folder; choose another path")
    if target.is_dir() and not overwrite and _entries(target):
        raise FileExistsError(f"output {target} already exists and is not empty; choose another path or overwrite it")
    existing = next(folder for folder in (target, *target.parents) if folder.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot create the output {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output {target}: no write permission in {existing}")
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds, its files become the content of `target`.

    A new `target` is the staging folder (a hidden sibling) renamed into place. An existing folder is filled in
    place, never renamed or replaced, so mount points, `.` and the shell's working folder work: staging is a hidden
    folder inside it, whose entries are moved in at the end (with `overwrite`, the old entries are moved out and
    deleted only once the new ones are in). On any error, `KeyboardInterrupt` included, staging is removed and an
    existing `target` keeps its old content. Folders and files get the usual permissions (those of `mkdir` and `open`
    under the umask), also files a library wrote owner-only (safetensors writes 0600). Staging names carry the process
    id, so later calls remove those of dead processes.

    Raises:
        `FileExistsError`: `target` is a non-empty folder and `overwrite` is False.
        `OutputError`: the output cannot be written (the message names the folder and the cause).
    """
    target = check_output_dir(target, overwrite=overwrite)
    existing = target.is_dir()
    if not existing:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the folder of the output {target}: {_reason(error)}") from error
    staging = _make_staging(target, target if existing else target.parent, "partial")
    try:
        yield staging
        _apply_umask(staging)
        if existing:
            _fill_in_place(target, staging, overwrite=overwrite)
        else:
            _rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `target` (beside it or inside it) whose process is gone; returns them."""
    target = Path(os.path.abspath(target))
    pattern = re.compile(rf"\.{re.escape(_name(target))}\.(?:{'|'.join(_STAGING_KINDS)})-(\d+)-[0-9a-f]+")
    removed = []
    for folder in (target.parent, target):
        if not folder.is_dir():
            continue
        try:
            candidates = list(folder.iterdir())
        except OSError:
            continue
        for entry in candidates:
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not _process_alive(int(match[1])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _name(target: Path) -> str:
    return target.name or "output"


def _entries(folder: Path, *, besides: tuple[Path, ...] = ()) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry not in besides]


def _make_staging(target: Path, parent: Path, kind: str) -> Path:
    while True:
        staging = parent / f".{_name(target)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(f"cannot write the output {target}: {_reason(error)}") from error


def _fill_in_place(target: Path, staging: Path, *, overwrite: bool) -> None:
    old_entries = _entries(target, besides=(staging,))
    if old_entries and not overwrite:
        raise FileExistsError(f"output {target} was filled by someone else meanwhile; nothing was changed")
    retired = _make_staging(target, target, "old") if old_entries else None
    moved_out = []
    moved_in = []
    try:
        for entry in old_entries:
            _rename(entry, retired / entry.name)
            moved_out.append(entry)
        for entry in sorted(staging.iterdir()):
            _rename(entry, target / entry.name)
            moved_in.append(entry)
    except BaseException:
        for entry in moved_in:
            os.replace(target / entry.name, entry)
        for entry in moved_out:
            os.replace(retired / entry.name, entry)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        raise
    staging.rmdir()
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _rename(source: Path, destination: Path) -> None:
    try:
        os.replace(source, destination)
    except OSError as error:
        raise OutputError(f"cannot move {source.name} into the output {destination.parent}: "
                          f"{_reason(error)}") from error


def _apply_umask(folder: Path) -> None:
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _umask() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.M)[1], 8)
    except (OSError, TypeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
