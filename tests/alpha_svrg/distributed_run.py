"""Train one alpha-SVRG case (also under `torchrun`) and write each rank's parameters and `mu` to `OUT/rank{i}.pt`.

    python -m torch.distributed.run --nproc_per_node 2 tests/alpha_svrg/distributed_run.py OUT --mode cache \
        --dataset-size 60 --batch 4 --steps 7
"""

import argparse
import json
from pathlib import Path

import torch

from hf_regtools.testing.harness import build_trainer

VIT = {"model": "transformers_vit", "callbacks": [], "deterministic": True,
       "mixin": "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin",
       "model_kwargs": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def main() -> None:
    from accelerate import PartialState

    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--svrg", type=json.loads, required=True, help="AlphaSVRGConfig as JSON")
    parser.add_argument("--dataset-size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="per-device batch size")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    trainer = build_trainer(VIT, args.output_dir / "run", max_steps=args.steps, batch_size=args.batch,
                            dataset_size=args.dataset_size, gradient_accumulation_steps=args.accumulation,
                            optim="sgd", learning_rate=0.05, max_grad_norm=0.0,
                            trainer_init_kwargs={"alpha_svrg": args.svrg})
    trainer.train()
    result = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    result["mu"] = torch.cat([g.reshape(-1) for g in trainer.svrg_optimizer.full_gradient])
    torch.save(result, args.output_dir / f"rank{PartialState().process_index}.pt")


if __name__ == "__main__":
    main()
