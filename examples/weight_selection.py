"""Weight selection (Xu et al., *Initializing Models with Larger Ones*, ICLR 2024): from a teacher to a pushed student.

Builds a student of the teacher's family (a preset, a config, or the teacher's architecture with overrides),
initializes it with a consistent, uniformly strided subset of the teacher's weights, writes it with its model card
to `--output_dir` and, with `--push_to_hub --hub_model_id org/name`, uploads it to the Hub. The student then loads
with `from_pretrained` (transformers) or `timm.create_model("hf-hub:org/name", pretrained=True)` (timm), ready for
fine-tuning (for example with `examples/dropout_schedules.py --model org/name`).

One process:

    python examples/weight_selection.py --teacher google/vit-base-patch16-224-in21k --student vit-tiny \
        --num_labels 100 --output_dir vit-tiny-ws --push_to_hub --hub_model_id my-org/vit-tiny-ws

Several processes, as the first step of a multi-process job: every process computes the same student (the
selection is deterministic) and the main process alone writes and pushes it:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/weight_selection.py --teacher timm/vit_small_patch16_224 \
        --student vit-tiny --output_dir vit-tiny-ws

The teacher is a Hub id (`org/name`, `org/name@revision`), a timm `hf-hub:` id or pretrained tag, or a local folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from hf_regtools import HubError, WeightSelectionConfig, initialize_student, push_folder


def _int_or_list(text: str | None) -> int | tuple[int, ...] | None:
    if text is None:
        return None
    values = tuple(int(part) for part in text.split(","))
    return values[0] if len(values) == 1 else values


@dataclass
class ExampleArguments:
    teacher: str = field(metadata={"help": "Hub id (org/name[@revision]), timm hf-hub: id or tag, or folder"})
    output_dir: str = field(metadata={"help": "where the student (weights, config, model card) is written"})
    student: str | None = field(default=None, metadata={
        "help": "preset (vit-tiny, vit-small, convnext-femto, ...), or Hub id / folder of the student's config; "
                "default: the teacher's architecture with the overrides below"})
    revision: str | None = field(default=None, metadata={"help": "teacher revision (branch, tag or commit)"})
    hidden_size: str | None = field(default=None, metadata={
        "help": "ViT width, or ConvNeXt widths per stage (a,b,c,d)"})
    depth: str | None = field(default=None, metadata={"help": "ViT blocks, or ConvNeXt blocks per stage (a,b,c,d)"})
    num_heads: int | None = field(default=None, metadata={"help": "ViT heads (default: keep the head dimension)"})
    mlp_dim: int | None = field(default=None, metadata={"help": "ViT MLP width (default: keep the MLP ratio)"})
    num_labels: int | None = field(default=None, metadata={"help": "the student's classes (default: the teacher's)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing non-empty output_dir"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the student to --hub_model_id"})
    hub_model_id: str | None = field(default=None, metadata={"help": "the Hub repo of the student (org/name)"})
    hub_private_repo: bool = field(default=False, metadata={"help": "create the Hub repo as private"})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, WeightSelectionConfig), description=__doc__.splitlines()[0])
    example, selection = parser.parse_args_into_dataclasses(args=argv)
    if example.push_to_hub and not example.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")
    try:
        select_and_push(example, selection)
    except (FileExistsError, HubError, ValueError) as error:  # bad input, unsupported model, Hub failure
        sys.exit(f"{parser.prog}: error: {error}")


def select_and_push(example: ExampleArguments, selection: WeightSelectionConfig) -> None:
    from accelerate import PartialState

    state = PartialState()
    result = initialize_student(example.teacher, example.student, revision=example.revision,
                                hidden_size=_int_or_list(example.hidden_size), depth=_int_or_list(example.depth),
                                num_heads=example.num_heads, mlp_dim=example.mlp_dim, num_labels=example.num_labels,
                                config=selection)
    if state.is_main_process:
        output = result.save(example.output_dir, overwrite=example.overwrite_output_dir)
        print(result.report)
        print(f"saved to {output}")
        if example.push_to_hub:
            try:
                sha = push_folder(output, example.hub_model_id, private=example.hub_private_repo or None,
                                  commit_message=f"Weight selection from {result.teacher}")
            except HubError as error:
                raise HubError(f"{error}. The student in {output} is complete; push it again later with `hf upload`"
                               ) from error
            print(f"pushed to {example.hub_model_id} (commit {sha})")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
