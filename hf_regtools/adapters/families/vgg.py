"""VGG networks in timm (`vgg11` ... `vgg19`, with or without BatchNorm).

Axes: the channels of each convolution (its output, the BatchNorm after it and the next convolution's input) are
left unnamed, so they follow the official rule, one index set per `(teacher width, student width)` pair: the same
pair gives the same set, which keeps every convolution consistent with the next under every selection mode except
importance. The head's MLP (`pre_logits`, a 7x7 and a 1x1 convolution) has named widths. timm's VGG keys number the
layers of one flat `features` sequence (convolutions, norms, activations and pools), so the student must have the
teacher's convolutions, in the same places; only their widths and the MLP's may shrink.
"""

from __future__ import annotations

from .. import ModelFamily, _linear

VGG = ModelFamily(
    library="timm", name="vgg", layout="vgg",
    signature=(r"^features\.0\.weight$", r"^pre_logits\.fc1\.weight$", r"^pre_logits\.fc2\.weight$"),
    classifier=("head.fc.",),
    fixed_depth=True,
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
)

FAMILIES: tuple[ModelFamily, ...] = (VGG,)
