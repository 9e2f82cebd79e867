"""VGG networks in timm (`vgg11` ... `vgg19`, with or without BatchNorm).

Axes: the channels of each convolution (its output, the BatchNorm after it and the next convolution's input) are
left unnamed, so they follow the official rule, one index set per `(teacher width, student width)` pair: the same
pair gives the same set, which keeps every convolution consistent with the next under every selection mode except
importance. The head's MLP (`pre_logits`, a 7x7 and a 1x1 convolution) has named widths. timm numbers the layers of
one flat `features` sequence (convolutions, norms, activations, pools); `vgg_blocks` reads the stages (runs of
convolutions between pools) and blocks (a convolution and its norm) from the keys, for layer selection; the first
convolution of a stage changes the width, so it always reads the teacher's first (`keep_first_block`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .. import ModelFamily, _linear

_FEATURE = re.compile(r"^features\.(\d+)\.(.+)$")


def vgg_blocks(keys: Iterable[str]) -> dict[str, tuple[str, int, str]]:
    """`(stage, block, part)` of every key of a timm VGG's `features`: a block is a convolution (part `conv.*`) and
    its BatchNorm (`norm.*`); a pool between two convolutions (one more layer between them than within a stage)
    starts the next stage."""
    layers: dict[int, list[tuple[str, str]]] = {}
    for key in keys:
        if match := _FEATURE.match(key):
            layers.setdefault(int(match[1]), []).append((key, match[2]))
    norms = {index for index, items in layers.items() if any(rest == "running_mean" for _, rest in items)}
    step = 3 if norms else 2  # conv, (norm,) activation
    blocks, stage, block, previous = {}, 0, -1, None
    for conv in sorted(set(layers) - norms):
        if previous is not None and conv - previous > step:
            stage, block = stage + 1, -1
        block, previous = block + 1, conv
        for part, index in (("conv", conv), ("norm", conv + 1)):
            if part == "conv" or index in norms:
                for key, rest in layers.get(index, []):
                    blocks[key] = (str(stage), block, f"{part}.{rest}")
    return blocks


VGG = ModelFamily(
    library="timm", name="vgg", layout="vgg",
    signature=(r"^features\.0\.weight$", r"^pre_logits\.fc1\.weight$", r"^pre_logits\.fc2\.weight$"),
    classifier=("head.fc.",),
    head_dropout=r"^head\.drop$",
    axes=(
        (r"^features\.\d+\.weight$", ("", "", None, None)),
        (r"^features\.\d+\.", ("",)),
        (r"\.num_batches_tracked$", ()),
        (r"^pre_logits\.fc1\.weight$", ("fc1", "", None, None)),
        (r"^pre_logits\.fc1\.bias$", ("fc1",)),
        *_linear(r"^pre_logits\.fc2", "fc2", "fc1", kernel=True),
        *_linear(r"^head\.fc", None, "fc2"),
    ),
    flat_blocks=vgg_blocks,
    keep_first_block=True,
)

FAMILIES: tuple[ModelFamily, ...] = (VGG,)
