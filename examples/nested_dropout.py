"""Bayesian nested networks (Cui et al., CVPR 2021) with the Trainer: train a nested CNN on digits, cut sub-networks.

`convert_to_nested` turns the convolutions whose output channels can be cut into `NestedConv2d` (a learned ordering
of channel groups plus a Gaussian weight posterior) and the dense layers into `LinearVDO`; the Trainer mixin adds
`--kl_weight * nested_kl(model)` to the loss once per optimizer step (logged as `hf_regtools/nested_dropout/kl`, with
`hf_regtools/nested_dropout/mean_keep_prob`). After training, `extract_subnet` cuts a smaller network at each width
of `--widths` (BatchNorm statistics recalibrated on the training images), and the script prints accuracy, ECE and
parameter count per width; the sub-network of width `--subnet_width` is saved to `<output_dir>/subnet` with its model
card (and pushed to `--hub_model_id` with `--push_to_hub`).

One process (CPU or GPU):

    python examples/nested_dropout.py --model vgg --subnet_width 0.5

Several processes (DDP; masks are drawn per process; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/nested_dropout.py --model transformers-resnet

Every `TrainingArguments` option works (`--max_steps`, `--learning_rate`, `--output_dir`, `--push_to_hub
--hub_model_id org/name`, `--resume_from_checkpoint`, ...). A smoke run: `--max_steps 4 --max_train_samples 256`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from _digits import digits, trainer_defaults
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from hf_regtools.nested_dropout import (NestedDropoutTrainerMixin, convert_to_nested, expected_calibration_error,
                                        extract_subnet, predict_mean, push_subnet, save_subnet)
from hf_regtools.testing.digits import tensors
from hf_regtools.testing.tiny_models import VGGClassifier

MODELS = ("vgg", "transformers-resnet")


@dataclass
class ExampleArguments:
    model: str = field(default="vgg", metadata={
        "help": f"one of {MODELS}: a VGG-style BatchNorm CNN for 8x8 digits, or a small transformers ResNet (32x32)"})
    kl_weight: float = field(default=1e-5, metadata={"help": "weight of the KL term (the official recipe: 1e-5)"})
    num_div: int = field(default=8, metadata={"help": "channel groups of each nested convolution"})
    freeze: int = field(default=2, metadata={"help": "leading groups that are always kept"})
    prior_pi: float = field(default=0.95, metadata={"help": "the ordering prior's beta"})
    widths: str = field(default="0,0.25,0.5,0.75,1", metadata={"help": "comma-separated widths rho to evaluate"})
    subnet_width: float = field(default=0.5, metadata={"help": "width of the sub-network to save (and push)"})
    weight_mode: str = field(default="sampled", metadata={
        "help": "'sampled' (Bayesian: weights drawn in every pass, --passes averaged) or 'deterministic'"})
    passes: int = field(default=8, metadata={"help": "forward passes averaged per prediction (sampled weights)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N test images"})


class NestedTrainer(NestedDropoutTrainerMixin, Trainer):
    pass


def build(name: str, num_labels: int = 10):
    """The model named `name` (see `MODELS`), its image size and channel count."""
    if name == "vgg":
        return VGGClassifier(config=(16, "M", 32, 32), hidden=32, num_labels=num_labels, channels=1), 8, 1
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                          layer_type="basic", num_labels=num_labels)
    return ResNetForImageClassification(config), 32, 1


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ExampleArguments, TrainingArguments), description=__doc__.splitlines()[0])
    parser.set_defaults(**{**trainer_defaults("outputs/nested_dropout"), "learning_rate": 3e-3, "weight_decay": 0.0})
    example, training_args = parser.parse_args_into_dataclasses(args=argv)
    if example.model not in MODELS:
        parser.error(f"--model must be one of {MODELS}, got {example.model!r}")
    widths = sorted({float(width) for width in example.widths.split(",")} | {example.subnet_width})
    set_seed(training_args.seed)

    model, image_size, channels = build(example.model)
    try:
        convert_to_nested(model, num_div=example.num_div, freeze=example.freeze, prior_pi=example.prior_pi)
        for rho in widths:
            extract_subnet(model, rho)  # checks the widths and the settings before training
    except ValueError as error:
        parser.error(str(error))
    train = digits("train", image_size=image_size, channels=channels, limit=example.max_train_samples)
    test = digits("test", image_size=image_size, channels=channels, limit=example.max_eval_samples)
    trainer = NestedTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                            kl_weight=example.kl_weight)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return

    nested = trainer.accelerator.unwrap_model(trainer.model).eval()
    device = next(nested.parameters()).device
    train_images = tensors(train)[0].to(device)
    test_images, test_labels = (tensor.to(device) for tensor in tensors(test))
    batches = [train_images[start:start + 128] for start in range(0, len(train_images), 128)]
    print("| rho | accuracy | ECE | parameters |")
    print("|---|---|---|---|")
    saved = None
    for rho in widths:
        subnet = extract_subnet(nested, rho, weight_mode=example.weight_mode, loader=batches)
        mean = predict_mean(subnet, test_images, passes=example.passes if example.weight_mode == "sampled" else 1)
        metrics = {"accuracy": round((mean.logits.argmax(1) == test_labels).float().mean().item(), 4),
                   "ece": round(expected_calibration_error(mean.logits, test_labels, from_logits=True), 4)}
        print(f"| {rho:g} | {metrics['accuracy']:.4f} | {metrics['ece']:.4f} | "
              f"{subnet.nested_subnet_info.parameters} |")
        if rho == example.subnet_width:
            saved = (subnet, metrics)
    subnet, metrics = saved
    folder = Path(training_args.output_dir) / "subnet"
    metrics["evaluated on"] = f"{len(test_labels)} digits test images"
    if training_args.push_to_hub:
        sha = push_subnet(subnet, training_args.hub_model_id, folder=folder, metrics=metrics, overwrite=True)
        print(f"pushed the width-{example.subnet_width:g} sub-network to {training_args.hub_model_id} (commit {sha})")
    else:
        save_subnet(subnet, folder, metrics=metrics, overwrite=True)
    print(f"saved the width-{example.subnet_width:g} sub-network to {folder}")


if __name__ == "__main__":
    main()
