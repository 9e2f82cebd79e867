"""Model families beyond ViT, ConvNeXt and Swin, one module per family group.

Each module defines `FAMILIES`, a tuple of `ModelFamily`; `ALL` gathers them for `hf_regtools.adapters.FAMILIES`.
"""

from __future__ import annotations

from .. import ModelFamily
from . import bert, gpt2, llama, resnet, vgg

ALL: tuple[ModelFamily, ...] = (*llama.FAMILIES, *gpt2.FAMILIES, *bert.FAMILIES, *resnet.FAMILIES, *vgg.FAMILIES)
