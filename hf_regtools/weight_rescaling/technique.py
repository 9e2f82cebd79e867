"""Registry entry and harness cases of weight rescaling (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

CALLBACK = "hf_regtools.weight_rescaling:WeightRescalingCallback"
MIXIN = "hf_regtools.weight_rescaling:WeightRescalingTrainerMixin"

# BatchNorm normalizes over each process's share of the batch, so 2 processes never equal 1 process with BN models:
# "deterministic" is False although nothing is random.
register(
    TechniqueInfo(
        name="weight_rescaling",
        title="Weight rescaling",
        paper="Liu et al., Weight Rescaling: Effective and Robust Regularization for Deep Neural Networks with Batch "
              "Normalization, arXiv 2021 (v2 2022)",
        arxiv="2102.03497",
        code_repo="",
        functional="hf_regtools.weight_rescaling:rescale_weights_",
        callback=CALLBACK,
        mixin=MIXIN,
        harness={"cases": {
            "transformers_resnet_sgd_momentum": {
                "model": "transformers_resnet", "callbacks": [(CALLBACK, {})],
                "optimizer": ("torch.optim:SGD", {"lr": 0.05, "momentum": 0.9}), "deterministic": False},
            "timm_resnet_mixin_weight_decay_every_2": {
                "model": "timm_resnet_classifier", "callbacks": [(CALLBACK, {"every": 2})], "mixin": MIXIN,
                "trainer_kwargs": {"weight_decay": 0.05}, "deterministic": False},
            "timm_resnet_adamw_optimizer_state": {
                "model": "timm_resnet_classifier", "callbacks": [(CALLBACK, {"rescale_optimizer_state": True})],
                "deterministic": False},
        }},
    )
)
