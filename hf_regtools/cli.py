"""`hf-regtools`: the command line.

```
hf-regtools list                               # registered techniques
hf-regtools select TEACHER --student vit-tiny --output DIR [--push-to-hub ORG/NAME]
hf-regtools demo                               # the offline digits demo
```
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence


def _int_or_list(text: str) -> int | tuple[int, ...]:
    values = tuple(int(part) for part in text.split(","))
    return values[0] if len(values) == 1 else values


def _add_dataclass_options(parser: argparse.ArgumentParser, config_class) -> None:
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "") + f" (default: {field.default})"
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = int if field.type in (int, "int") else str
            parser.add_argument(flag, type=kind, default=field.default, choices=field.metadata.get("choices"),
                                help=help_text)


def _parser() -> argparse.ArgumentParser:
    from .weight_selection.config import WeightSelectionConfig

    parser = argparse.ArgumentParser(prog="hf-regtools", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="list the registered techniques")

    select = commands.add_parser(
        "select", help="initialize a small model from a larger pretrained one by weight selection",
        description="Weight selection (Xu et al., ICLR 2024): build a student of the teacher's family and "
                    "initialize it with a consistent, uniformly strided subset of the teacher's weights.")
    select.add_argument("teacher", help="Hub id (org/name[@revision]), timm hf-hub: id or pretrained tag, or folder")
    select.add_argument("--revision", help="teacher revision (branch, tag or commit)")
    select.add_argument("--student", help="preset (vit-tiny, convnext-femto, ...), Hub id or folder of the student's "
                                          "config; default: the teacher's config with the overrides below")
    select.add_argument("--hidden-size", type=_int_or_list, help="ViT width, or ConvNeXt widths per stage (a,b,c,d)")
    select.add_argument("--depth", type=_int_or_list, help="ViT blocks, or ConvNeXt blocks per stage (a,b,c,d)")
    select.add_argument("--num-heads", type=int, help="ViT attention heads (default: keep the head dimension)")
    select.add_argument("--mlp-dim", type=int, help="ViT MLP width (default: keep the MLP ratio)")
    select.add_argument("--num-labels", type=int, help="student classes (default: the teacher's)")
    _add_dataclass_options(select, WeightSelectionConfig)
    select.add_argument("--output", required=True, help="output folder (weights, config, model card)")
    select.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    select.add_argument("--push-to-hub", metavar="ORG/NAME", help="also create this Hub repo and upload the folder")
    select.add_argument("--private", action="store_true", help="create the Hub repo as private")

    demo = commands.add_parser("demo", help="weight selection on scikit-learn digits, next to random init")
    demo.add_argument("--teacher", help="Hub id of a pretrained ViT/ConvNeXt teacher (needs a network); default: "
                                        "train a small ViT teacher on digits 0-4")
    demo.add_argument("--student", help="student preset, Hub id or config folder (default: vit-tiny / convnext-femto for "
                                        "a Hub teacher, half the default teacher otherwise)")
    demo.add_argument("--output-dir", default="outputs", help="where the plot, the table and the student go")
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps per student")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "select":
            return _select(args)
        from ._demo import run_demo

        run_demo(teacher=args.teacher, student=args.student, output_dir=args.output_dir, steps=args.steps,
                 seed=args.seed)
        return 0
    except _user_errors() as error:
        print(f"hf-regtools {args.command}: error: {error}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapters import UnsupportedModelError
    from .checkpoint import CheckpointError
    from .hub import HubError
    from .weight_selection import WeightSelectionError

    return (WeightSelectionError, UnsupportedModelError, CheckpointError, HubError, FileExistsError, ValueError)


def _list() -> int:
    from ._registry import list_techniques

    for info in list_techniques():
        command = f"  [hf-regtools {info.cli_command}]" if info.cli_command else ""
        print(f"{info.name:<20} {info.title}: {info.paper} ({info.url}){command}")
    return 0


def _select(args: argparse.Namespace) -> int:
    from .hub import HubError, push_folder
    from .weight_selection import WeightSelectionConfig, initialize_student

    config = WeightSelectionConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WeightSelectionConfig)})
    result = initialize_student(args.teacher, args.student, revision=args.revision, hidden_size=args.hidden_size,
                                depth=args.depth, num_heads=args.num_heads, mlp_dim=args.mlp_dim,
                                num_labels=args.num_labels, config=config)
    output = result.save(args.output, overwrite=args.overwrite)
    print(result.report)
    print(f"saved to {output}")
    if args.push_to_hub:
        try:
            sha = push_folder(output, args.push_to_hub, private=args.private or None,
                              commit_message=f"Weight selection from {result.teacher}")
        except HubError as error:
            raise HubError(f"{error}. The local output in {output} is complete and intact; push it again later "
                           "with `hf upload`") from error
        print(f"pushed to {args.push_to_hub} (commit {sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
