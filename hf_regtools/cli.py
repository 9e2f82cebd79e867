"""`hf-regtools`: the command line.

```
hf-regtools list                               # registered techniques and their Trainer classes
hf-regtools select TEACHER --student vit-tiny --output DIR [--push-to-hub ORG/NAME]
hf-regtools gradinit MODEL --data DATA --output DIR [--iterations 100 ...] [--push-to-hub ORG/NAME]
hf-regtools select-data --target T --source S --backbone MODEL --num-classes N --output DIR [--push-to-hub ORG/NAME]
hf-regtools demo                               # the offline digits demo
```

Building the parser and `list` import neither torch, transformers nor timm, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

TERMINATED_EXIT_CODE, INTERRUPTED_EXIT_CODE, ERROR_EXIT_CODE = 128 + signal.SIGTERM, 130, 2


class CLIError(Exception):
    """A user error the command line reports in one line (exit code 2)."""


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that `with` blocks (staging folders) clean up."""


def _int_or_list(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}") from None
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
    from . import __version__
    from .adapters import PRESETS
    from .data_selection.command import add_arguments as add_select_data_arguments
    from .gradinit.command import add_arguments as add_gradinit_arguments
    from .weight_selection.config import WeightSelectionConfig

    parser = argparse.ArgumentParser(prog="hf-regtools", description="hf_regtools on the command line: "
                                     "weight selection, GradInit, the technique registry and the digits demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("list", help="list the registered techniques and their Trainer classes",
                        description="List the registered techniques: paper, CLI command and Trainer classes "
                                    "(callbacks, mixins, optimizers).")

    select = commands.add_parser(
        "select", help="initialize a small model from a larger pretrained one by weight selection",
        description="Weight selection (Xu et al., ICLR 2024): build a student of the teacher's family and "
                    "initialize it with a consistent, uniformly strided subset of the teacher's weights.")
    select.add_argument("teacher", help="Hub id (org/name[@revision]), timm hf-hub: id or pretrained tag, or folder")
    select.add_argument("--revision", help="teacher revision (branch, tag or commit)")
    select.add_argument("--student", help=f"preset (one of {', '.join(PRESETS)}), Hub id or folder of the student's "
                                          "config; default: the teacher's config with the overrides below")
    select.add_argument("--hidden-size", type=_int_or_list, help="ViT or decoder width, or ConvNeXt / ResNet widths "
                                                                 "per stage (a,b,c,d)")
    select.add_argument("--depth", type=_int_or_list, help="ViT or decoder blocks, or ConvNeXt / ResNet blocks per "
                                                           "stage (a,b,c,d)")
    select.add_argument("--num-heads", type=int, help="attention (query) heads (default: keep the head dimension)")
    select.add_argument("--num-key-value-heads", type=int, help="key/value heads of a grouped-query-attention "
                                                                "decoder (default: keep the query heads per group)")
    select.add_argument("--head-dim", type=int, help="decoder head dimension (default: the teacher's; a smaller one "
                                                     "keeps rotary pairs together)")
    select.add_argument("--mlp-dim", type=int, help="MLP width (default: keep the MLP ratio)")
    select.add_argument("--num-labels", type=int, help="student classes (default: the teacher's)")
    _add_dataclass_options(select, WeightSelectionConfig)
    select.add_argument("--selection", dest="mode", choices=("uniform", "importance"), default=argparse.SUPPRESS,
                        help="element selection (an alias of --mode): uniform (the paper's), or importance on "
                             "--calibration-data")
    select.add_argument("--output", required=True, help="output folder (weights, config, model card); an existing "
                                                        "empty folder is filled in place")
    select.add_argument("--overwrite", action="store_true", help="replace the content of an existing non-empty "
                                                                 "output folder")
    select.add_argument("--push-to-hub", metavar="REPO_ID", help="also create this Hub repo (org/name, or name for "
                                                                 "your own namespace) and upload the folder")
    select.add_argument("--private", action="store_true", help="create the Hub repo as private")

    gradinit = commands.add_parser(
        "gradinit", help="rescale a classifier's initialization by GradInit on a dataset",
        description="GradInit (Zhu et al., NeurIPS 2021): learn one scale per weight and bias tensor so that one step "
                    "of the intended optimizer (SGD or Adam) lowers the loss most, under a cap on the initial "
                    "gradient norm, on batches of your data; save the rescaled model with its preprocessing, "
                    "the scales and a model card. Image models (transformers, timm) and text models (transformers "
                    "sequence classification) get a head of the data's classes.")
    add_gradinit_arguments(gradinit)

    select_data = commands.add_parser(
        "select-data", help="select the pre-training classes closest to a target task by unbalanced OT",
        description="Pre-training data selection (Liu et al., NeurIPS 2022): class prototypes of the target and the "
                    "source under a pretrained backbone, entropic unbalanced optimal transport between them, and "
                    "every source example of the N classes that receive the most mass; saved with save_to_disk, "
                    "with report.json, report.png and a dataset card.")
    add_select_data_arguments(select_data)

    demo = commands.add_parser(
        "demo", help="weight selection on scikit-learn digits, next to random init",
        description="The offline demo: train a small ViT teacher on digits 0-4 (or take a Hub teacher), initialize "
                    "a student from it by weight selection, fine-tune it and the same student from random init on "
                    "digits 5-9, and write the accuracy table, the plot and the student.")
    demo.add_argument("--teacher", help="Hub id of a pretrained ViT/ConvNeXt teacher (needs a network); default: "
                                        "train a small ViT teacher on digits 0-4")
    demo.add_argument("--student", help="student preset, Hub id or config folder (default: vit-tiny / convnext-femto "
                                        "for a Hub teacher, half the default teacher otherwise)")
    demo.add_argument("--output-dir", default="outputs", help="where the plot, the table and the student go "
                                                              "(default: outputs)")
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps per student (default: 150)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of data order and initialization (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `hf-regtools`; returns the exit code (2 for user errors, 130 on Ctrl-C, 143 on SIGTERM)."""
    command = "hf-regtools"
    with _sigterm_raises():
        try:
            args = _parser().parse_args(argv)
            command = f"hf-regtools {args.command}"
            return _run(args)
        except KeyboardInterrupt:
            print(f"\n{command}: interrupted", file=sys.stderr)
            return INTERRUPTED_EXIT_CODE
        except _Terminated:
            print(f"{command}: terminated", file=sys.stderr)
            return TERMINATED_EXIT_CODE
        except Exception as error:
            if not isinstance(error, _user_errors()):
                raise
            print(f"{command}: error: {error}", file=sys.stderr)
            return ERROR_EXIT_CODE


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        return _list()
    if args.command == "select":
        return _select(args)
    if args.command == "gradinit":
        from .gradinit.command import main as gradinit_main

        return gradinit_main(args, output_exists=_output_exists)
    if args.command == "select-data":
        from .data_selection.command import main as select_data_main

        return select_data_main(args, output_exists=_output_exists)
    from ._demo import run_demo

    run_demo(teacher=args.teacher, student=args.student, output_dir=args.output_dir, steps=args.steps, seed=args.seed)
    return 0


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `_Terminated` in the main thread (once; later ones are ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors reported in one line: ours, `ValueError` and `OSError` (classes of modules not imported yet cannot
    have been raised, so they are not imported for this)."""
    ours = {"hf_regtools.adapters": "UnsupportedModelError", "hf_regtools.checkpoint": "CheckpointError",
            "hf_regtools.hub": "HubError", "hf_regtools.weight_selection.functional": "WeightSelectionError",
            "hf_regtools.gradinit.command": "GradInitCommandError",
            "hf_regtools.data_selection.command": "SelectDataError"}
    loaded = tuple(getattr(sys.modules[module], name) for module, name in ours.items() if module in sys.modules)
    return (CLIError, ValueError, OSError, *loaded)


def _list() -> int:
    from ._registry import list_techniques

    for info in list_techniques():
        command = f"  [hf-regtools {info.cli_command}]" if info.cli_command else ""
        print(f"{info.name:<20} {info.title}: {info.paper} ({info.url}){command}")
        for kind, targets in _trainer_classes(info).items():
            print(f"{'':<20}   {kind}: {', '.join(target.rpartition(':')[2] for target in targets)}")
    return 0


def _trainer_classes(info) -> dict[str, list[str]]:
    """`{"callbacks": [...], "mixin": [...], "optimizer": [...]}` of a technique, as `module:attribute` strings."""
    callbacks = [info.callback, *info.callbacks]
    kinds = {"callbacks": callbacks, "mixin": [info.mixin], "optimizer": [info.optimizer]}
    return {kind: list(dict.fromkeys(filter(None, targets))) for kind, targets in kinds.items() if any(targets)}


def _select(args: argparse.Namespace) -> int:
    from ._io import check_output_dir

    try:
        output = check_output_dir(args.output, overwrite=args.overwrite)
    except FileExistsError as error:
        raise _output_exists(args.output) from error
    push_id = None
    if args.push_to_hub:
        from .hub import push_target

        push_id = push_target(args.push_to_hub)

    from .weight_selection import WeightSelectionConfig, initialize_student

    config = WeightSelectionConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WeightSelectionConfig)})
    result = initialize_student(args.teacher, args.student, revision=args.revision, hidden_size=args.hidden_size,
                                depth=args.depth, num_heads=args.num_heads, mlp_dim=args.mlp_dim,
                                num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
                                num_labels=args.num_labels, config=config)
    return save_and_push(result, output, args, push_id=push_id,
                         summary=f"{result.report}\nteacher weights: {result.weights_summary}",
                         commit_message=f"Weight selection from {result.teacher}")


def save_and_push(result, output, args: argparse.Namespace, *, push_id: str | None, summary: str,
                  commit_message: str, repo_type: str | None = None) -> int:
    """Save a command's `result` (`result.save(output, overwrite=, repo_id=)`) into the checked `output`, print
    `summary`, and push the folder to `push_id` (checked beforehand with `hub.push_target`) when given, as a
    `repo_type` repo (default: a model). A failed push says that the local output is complete and how to push it
    again."""
    from .hub import HubError, push_folder

    try:
        result.save(output, overwrite=args.overwrite, repo_id=push_id)
    except FileExistsError as error:
        raise _output_exists(output) from error
    print(summary)
    print(f"saved to {output}")
    if push_id:
        try:
            sha = push_folder(output, push_id, private=args.private or None, commit_message=commit_message,
                              repo_type=repo_type)
        except HubError as error:
            kind = f" --repo-type {repo_type}" if repo_type else ""
            raise HubError(f"{error}. The local output in {output} is complete and intact; push it again later "
                           f"with `hf upload{kind} {push_id} {output}`") from error
        print(f"pushed to {push_id} (commit {sha})")
    return 0


def _output_exists(output) -> CLIError:
    return CLIError(f"output {output} already exists and is not empty; choose another --output, or pass --overwrite "
                    "to replace its content")


if __name__ == "__main__":
    sys.exit(main())
