"""Run under `torchrun --nproc_per_node 2` (CPU, gloo): each rank computes the prototypes of the saved dataset in
argv[1] (map-style, and streamed from a parquet copy) and writes them as `{map,stream}-<rank>.safetensors`."""

import sys
from pathlib import Path

import datasets
import torch.distributed

from hf_regtools.data_selection.prototypes import class_prototypes
from tests.data_selection.prototype_data import streaming, timm_backbone

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    data = datasets.load_from_disk(str(folder / "data"))
    rank = int(__import__("os").environ["RANK"])
    (folder / f"rank{rank}").mkdir(exist_ok=True)
    model = timm_backbone()
    for kind, dataset in (("map", data), ("stream", streaming(data, folder / f"rank{rank}"))):
        result = class_prototypes(model, dataset, progress=False, batch_size=4, device="cpu")
        result.save(folder / f"{kind}-{rank}.safetensors")
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
