"""BatchNorm ResNets in timm (`ResNet`: resnet18/34/50/..., the `d`/`t` variants' deep stems and average-pool
shortcuts) and transformers (`ResNetForImageClassification`), with basic or bottleneck blocks.

Axes: `c0` for the stem's output, `c1`.. for each stage's output (the residual stream of the stage), numbered alike
in both libraries; `mid{stage}.{block}` for a block's inner width (a basic block's first convolution, a bottleneck's
reduced width); `stem0`, `stem1` for the inner widths of timm's deep stem. A stage's first block reads the previous
stage's channels and, with a downsampling shortcut, maps them by its 1x1 convolution; without one (the stem as wide
as the first stage, basic blocks) the identity adds the stem's output to the stage's, so `c1` is `c0`
(`ModelFamily.shared_axes`). BatchNorm weight, bias and running statistics follow their channels;
`num_batches_tracked` is copied. Basic and bottleneck checkpoints are two key layouts of one family each (a
bottleneck has a third convolution). ResNeXt (grouped convolutions) and blocks with squeeze-and-excitation are not
covered.
"""

from __future__ import annotations

from dataclasses import replace

from .. import ModelFamily, _linear

_NO_DROP_SITES = (
    "timm ResNets build no stochastic-depth module where the rate is 0 (the first block, or all blocks at "
    "drop_path_rate=0) and apply the head's dropout as a function; transformers ResNets have neither."
)

_TIMM_STAGE = r"^layer(?P<stage>\d+)\."
_TIMM_FIRST = _TIMM_STAGE + r"(?P<layer>0)\."
_TIMM_BLOCK = _TIMM_STAGE + r"(?P<layer>\d+)\."
_TIMM_STEM = (
    (r"^conv1\.weight$", ("c0", "", None, None)),
    (r"^conv1\.0\.weight$", ("stem0", "", None, None)),
    (r"^conv1\.1\.", ("stem0",)),
    (r"^conv1\.3\.weight$", ("stem1", "stem0", None, None)),
    (r"^conv1\.4\.", ("stem1",)),
    (r"^conv1\.6\.weight$", ("c0", "stem1", None, None)),
    (r"^bn1\.", ("c0",)),
    (r"\.num_batches_tracked$", ()),
    (_TIMM_FIRST + r"downsample\.\d\.weight$", ("c{stage}", "c{stage-1}", None, None)),
    (_TIMM_FIRST + r"downsample\.\d\.", ("c{stage}",)),
    (_TIMM_FIRST + r"conv1\.weight$", ("mid{stage}.{layer}", "c{stage-1}", None, None)),
    (_TIMM_BLOCK + r"conv1\.weight$", ("mid{stage}.{layer}", "c{stage}", None, None)),
    (_TIMM_BLOCK + r"bn1\.", ("mid{stage}.{layer}",)),
)
_TIMM_BASIC = (
    (_TIMM_BLOCK + r"conv2\.weight$", ("c{stage}", "mid{stage}.{layer}", None, None)),
    (_TIMM_BLOCK + r"bn2\.", ("c{stage}",)),
)
_TIMM_BOTTLENECK = (
    (_TIMM_BLOCK + r"conv2\.weight$", ("mid{stage}.{layer}", "mid{stage}.{layer}", None, None)),
    (_TIMM_BLOCK + r"bn2\.", ("mid{stage}.{layer}",)),
    (_TIMM_BLOCK + r"conv3\.weight$", ("c{stage}", "mid{stage}.{layer}", None, None)),
    (_TIMM_BLOCK + r"bn3\.", ("c{stage}",)),
)
_TIMM_BOTTLENECK_KEY = r"^layer\d+\.\d+\.conv3\.weight$"
TIMM_RESNET = ModelFamily(
    library="timm", name="resnet", layout="resnet",
    signature=(r"^layer1\.0\.conv1\.weight$", r"^bn1\.weight$"),
    exclude=(_TIMM_BOTTLENECK_KEY, r"\.se\."),
    classifier=("fc.",),
    unsupported={"dropout_schedules": _NO_DROP_SITES},
    axes=(*_TIMM_STEM, *_TIMM_BASIC, *_linear(r"^fc", None, "c{last}")),
    layers=_TIMM_BLOCK,
    shared_axes=((r"^layer{stage}\.0\.downsample\.", "c{stage}", "c{stage-1}"),),
    keep_first_block=True,
)
TIMM_RESNET_BOTTLENECK = replace(
    TIMM_RESNET, signature=(*TIMM_RESNET.signature, _TIMM_BOTTLENECK_KEY), exclude=(r"\.se\.",),
    axes=(*_TIMM_STEM, *_TIMM_BOTTLENECK, *_linear(r"^fc", None, "c{last}")))

_STAGE = r"(^|\.)encoder\.stages\.(?P<stage>\d+)\.layers\."
_FIRST = _STAGE + r"(?P<layer>0)\."
_BLOCK = _STAGE + r"(?P<layer>\d+)\."
_STEM = (
    (r"(^|\.)embedder\.embedder\.convolution\.weight$", ("c0", "", None, None)),
    (r"(^|\.)embedder\.embedder\.normalization\.", ("c0",)),
    (r"\.num_batches_tracked$", ()),
    (_FIRST + r"shortcut\.convolution\.weight$", ("c{stage+1}", "c{stage}", None, None)),
    (_FIRST + r"shortcut\.normalization\.", ("c{stage+1}",)),
    (_FIRST + r"layer\.0\.convolution\.weight$", ("mid{stage+1}.{layer}", "c{stage}", None, None)),
    (_BLOCK + r"layer\.0\.convolution\.weight$", ("mid{stage+1}.{layer}", "c{stage+1}", None, None)),
    (_BLOCK + r"layer\.0\.normalization\.", ("mid{stage+1}.{layer}",)),
)
_BASIC = (
    (_BLOCK + r"layer\.1\.convolution\.weight$", ("c{stage+1}", "mid{stage+1}.{layer}", None, None)),
    (_BLOCK + r"layer\.1\.normalization\.", ("c{stage+1}",)),
)
_BOTTLENECK = (
    (_BLOCK + r"layer\.1\.convolution\.weight$", ("mid{stage+1}.{layer}", "mid{stage+1}.{layer}", None, None)),
    (_BLOCK + r"layer\.1\.normalization\.", ("mid{stage+1}.{layer}",)),
    (_BLOCK + r"layer\.2\.convolution\.weight$", ("c{stage+1}", "mid{stage+1}.{layer}", None, None)),
    (_BLOCK + r"layer\.2\.normalization\.", ("c{stage+1}",)),
)
_CLASSIFIER = _linear(r"^classifier\.1", None, "c{last+1}")
_BOTTLENECK_KEY = r"(^|\.)encoder\.stages\.\d+\.layers\.\d+\.layer\.2\.convolution\.weight$"
TRANSFORMERS_RESNET = ModelFamily(
    library="transformers", name="resnet", layout="resnet",
    signature=(r"(^|\.)embedder\.embedder\.convolution\.weight$", _STAGE + r"0\.layer\.0\.convolution\.weight$"),
    exclude=(_BOTTLENECK_KEY,),
    classifier=("classifier.",),
    unsupported={"dropout_schedules": _NO_DROP_SITES},
    axes=(*_STEM, *_BASIC, *_CLASSIFIER),
    layers=_BLOCK,
    shared_axes=((r"(^|\.)encoder\.stages\.{stage}\.layers\.0\.shortcut\.", "c{stage+1}", "c{stage}"),),
    keep_first_block=True,
)
TRANSFORMERS_RESNET_BOTTLENECK = replace(
    TRANSFORMERS_RESNET, signature=(*TRANSFORMERS_RESNET.signature, _BOTTLENECK_KEY), exclude=(),
    axes=(*_STEM, *_BOTTLENECK, *_CLASSIFIER))

FAMILIES: tuple[ModelFamily, ...] = (TIMM_RESNET, TIMM_RESNET_BOTTLENECK, TRANSFORMERS_RESNET,
                                     TRANSFORMERS_RESNET_BOTTLENECK)
