"""Layer selection: which teacher block each student block reads.

A family's `ModelFamily.layers` regex finds the block index (group `layer`, and `stage` for staged families) in a
key. Student block `i` of a stage reads teacher block `map[i]` of the same stage; `"first"` (the paper's default)
maps `i` to `i`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .axes import WeightSelectionError, uniform_indices

LAYER_SCHEMES = ("first", "last", "even")
LayerChoice = str | Sequence[int] | Sequence[Sequence[int]]


def block_depths(pattern: str | None, keys: Iterable[str]) -> dict[str, int]:
    """Blocks per stage (`""` for a family without stages) found in `keys`."""
    if pattern is None:
        return {}
    found: dict[str, set[int]] = {}
    for key in keys:
        if match := re.search(pattern, key):
            found.setdefault(match.groupdict().get("stage") or "", set()).add(int(match["layer"]))
    return {stage: max(layers) + 1 for stage, layers in sorted(found.items(), key=lambda item: _stage_order(item[0]))}


def _stage_order(stage: str) -> int:
    return int(stage) if stage.isdigit() else -1


def layer_map(layers: LayerChoice, teacher_depths: dict[str, int], student_depths: dict[str, int], *,
              keep_first: bool = False) -> dict[str, list[int]]:
    """For every stage, the teacher block each student block reads.

    Args:
        layers (`str` or list): `"first"` (the first N blocks, the paper's default), `"last"` (the last N), `"even"`
            (evenly spaced: the uniform element rule applied to blocks, `uniform_indices(T, N)`), a list of teacher
            block indices (one per student block, increasing), or one such list per stage; as text, `"0,2,5"` and
            `"0,1;0,2"` (stages separated by `;`).
        teacher_depths, student_depths (`dict[str, int]`): blocks per stage (`block_depths`).
        keep_first (`bool`, *optional*, defaults to `False`): student block 0 reads teacher block 0 in every stage
            (`ModelFamily.keep_first_block`): `"last"` takes block 0 and the last N-1, explicit lists must start with
            0 (`"first"` and `"even"` always do).
    """
    missing = [stage for stage in student_depths if stage not in teacher_depths]
    if missing:
        raise WeightSelectionError(f"the student has stages {missing} the teacher does not have")
    stages = list(student_depths)
    explicit = None
    if isinstance(layers, str) and layers not in LAYER_SCHEMES and re.fullmatch(r"[\d,;\s]+", layers):
        lists = [[int(i) for i in part.split(",") if i.strip()] for part in layers.split(";")]
        layers = lists if ";" in layers else lists[0]
    if isinstance(layers, str):
        if layers not in LAYER_SCHEMES:
            raise WeightSelectionError(f"unknown layer selection {layers!r}; choose one of {LAYER_SCHEMES} or give "
                                       "the teacher block indices (e.g. [0, 2, 5])")
    else:
        layers = [list(item) if isinstance(item, Sequence) else item for item in layers]
        nested = all(isinstance(item, list) for item in layers)
        if nested and len(layers) != len(stages):
            raise WeightSelectionError(f"one list of teacher blocks per stage is needed ({len(stages)} stages), got "
                                       f"{len(layers)}")
        if not nested:
            if len(stages) != 1:
                raise WeightSelectionError(f"the model has {len(stages)} stages: give one list of teacher blocks per "
                                           "stage, e.g. [[0, 1], [0, 2], ...]")
            layers = [layers]
        explicit = dict(zip(stages, layers))
    mapping = {}
    for stage in stages:
        teacher, student = teacher_depths[stage], student_depths[stage]
        where = f" in stage {stage}" if stage else ""
        if student > teacher:
            raise WeightSelectionError(f"the student has {student} blocks{where}, the teacher {teacher}: weight "
                                       "selection needs a student no deeper than its teacher")
        if explicit is not None:
            chosen = [int(i) for i in explicit[stage]]
            if len(chosen) != student or any(not 0 <= i < teacher for i in chosen) or chosen != sorted(set(chosen)):
                raise WeightSelectionError(f"layers{where} {chosen}: need {student} distinct increasing teacher block "
                                           f"indices in 0..{teacher - 1} (the student has {student} blocks{where})")
            if keep_first and chosen[0] != 0:
                raise WeightSelectionError(f"layers{where} {chosen}: the first block of a stage changes its width and "
                                           "resolution, so student block 0 must read teacher block 0; start the list "
                                           "with 0")
        elif layers == "first":
            chosen = list(range(student))
        elif layers == "last":
            kept = int(keep_first)
            chosen = list(range(kept)) + list(range(teacher - student + kept, teacher))
        else:
            chosen = uniform_indices(teacher, student).tolist()
        mapping[stage] = chosen
    return mapping


def teacher_key(pattern: str | None, key: str, mapping: dict[str, list[int]]) -> str:
    """The teacher key that student `key` reads under `mapping`."""
    if pattern is None or not (match := re.search(pattern, key)):
        return key
    stage = match.groupdict().get("stage") or ""
    block = mapping[stage][int(match["layer"])]
    start, end = match.span("layer")
    return f"{key[:start]}{block}{key[end:]}"


def flat_block_depths(blocks: dict[str, tuple[str, int, str]]) -> dict[str, int]:
    """Blocks per stage of a family with flat layer numbering, from its `ModelFamily.flat_blocks` result."""
    found: dict[str, int] = {}
    for stage, block, _ in blocks.values():
        found[stage] = max(found.get(stage, 0), block + 1)
    return dict(sorted(found.items(), key=lambda item: _stage_order(item[0])))


def flat_teacher_keys(keys: Iterable[str], student_blocks: dict[str, tuple[str, int, str]],
                      teacher_blocks: dict[str, tuple[str, int, str]], mapping: dict[str, list[int]]
                      ) -> dict[str, str]:
    """The teacher key each student key reads under `mapping`, for a family with flat layer numbering: the same
    part of the mapped teacher block, or the same key outside blocks (a part the teacher block lacks maps to a key
    the teacher does not have)."""
    by_place = {place: key for key, place in teacher_blocks.items()}
    sources = {}
    for key in keys:
        if key not in student_blocks:
            sources[key] = key
            continue
        stage, block, part = student_blocks[key]
        sources[key] = by_place.get((stage, mapping[stage][block], part), f"<{part} of block {block} in stage {stage}>")
    return sources
