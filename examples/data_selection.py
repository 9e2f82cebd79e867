"""Pre-training data selection by UOT + two-head fine-tuning (Liu et al., NeurIPS 2022) on scikit-learn's digits.

End to end and offline (`hf_regtools.testing.digits_transfer`): a source of 60 classes (10 digits x 6 class-specific
transforms, two close to the target task, four far), a small ResNet pre-trained on it, and a target of noisy held-out
digits with a few labelled examples per class. The pre-trained backbone gives class prototypes (`class_prototypes`),
unbalanced OT selects `--num_classes` source classes (`uot_select_classes`), and `TwoStreamTrainerMixin` fine-tunes a
`TwoHeadModel` on target + selected data, against target-only fine-tuning and randomly chosen source classes. Prints a
table of test accuracies (mean over `--seeds`) and the share of selected classes whose transform is close to the
target's; writes `data_selection_results.json` to `--output_dir`.

One process (CPU or GPU):

    python examples/data_selection.py --seeds 0,1,2 --num_classes 20

Several processes (the fine-tuning runs under DDP; on CPU give each process one thread):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/data_selection.py

A smoke run: `--seeds 0 --steps 4 --pretrain_steps 4`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from hf_regtools.testing import digits_transfer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the target split and fine-tuning")
    parser.add_argument("--num_classes", type=int, default=20, help="source classes to select (of 60)")
    parser.add_argument("--per_class", type=int, default=5, help="labelled target examples per class")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps")
    parser.add_argument("--pretrain_steps", type=int, default=300, help="pre-training steps on the source")
    parser.add_argument("--output_dir", default="data_selection_digits")
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    results = digits_transfer.run(seeds, n_classes=args.num_classes, per_class=args.per_class,
                                  pretrain_steps=args.pretrain_steps, steps=args.steps)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    rows = []
    for method in ("target only", "UOT-selected", "random classes"):
        chosen = [r for r in results if r.method == method]
        accuracy = statistics.mean(r.accuracy for r in chosen)
        close = statistics.mean(digits_transfer.close_fraction(r.selected) for r in chosen) if chosen[0].selected \
            else None
        rows.append({"method": method, "accuracy": accuracy, "close_fraction": close,
                     "per_seed": [r.accuracy for r in chosen]})
    print("| method | test accuracy (mean) | per seed | selected classes with a close transform |")
    print("|---|---|---|---|")
    for row in rows:
        close = "-" if row["close_fraction"] is None else f"{row['close_fraction']:.2f}"
        print(f"| {row['method']} | {row['accuracy']:.4f} | {', '.join(f'{a:.3f}' for a in row['per_seed'])} | "
              f"{close} |")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "data_selection_results.json"), "w") as file:
        json.dump({"settings": vars(args), "results": rows}, file, indent=1)


if __name__ == "__main__":
    main()
