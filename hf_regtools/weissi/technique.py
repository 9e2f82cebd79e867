"""Registry entry and harness cases of WEISSI (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.weissi:WeissiTrainerMixin"

# The MLP has no BatchNorm and no randomness: 2 processes equal 1, and batch 8 equals 4 x 2 accumulation steps (the
# penalty counts once per optimizer step). The ResNets have BatchNorm ("deterministic": False) and their convolutions
# all feed one, so they run with bn="include" to exercise the residual blocks; the transformers case uses the spectral
# norm, whose power-iteration vectors must survive a resume.
register(
    TechniqueInfo(
        name="weissi",
        title="WEISSI",
        paper="Liu, Cui and Chan, Improve Generalization and Robustness of Neural Networks via Weight Scale Shifting "
              "Invariant Regularizations, ICML 2021 Workshop on Adversarial Machine Learning (arXiv 2020, v2 2022)",
        arxiv="2008.02965",
        code_repo="",
        functional="hf_regtools.weissi:weissi_penalty",
        mixin=MIXIN,
        harness={"cases": {
            "mlp_weight_decay_replaced": {
                "model": "mlp_classifier", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"weissi": {"lambda1": 0.05, "lambda2": 0.01}},
                "trainer_kwargs": {"weight_decay": 0.01}, "deterministic": True, "accumulation_equivalent": True},
            "timm_resnet_residual_blocks": {
                "model": "timm_resnet_classifier", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"weissi": {"lambda1": 0.05, "lambda2": 0.001, "bn": "include",
                                                   "schedule": "linear", "warmup": 0.25}},
                "deterministic": False},
            "transformers_resnet_spectral": {
                "model": "transformers_resnet", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"weissi": {"lambda1": 0.05, "lambda2": 0.001, "bn": "include",
                                                   "norm": "spectral"}},
                "deterministic": False},
        }},
    )
)
