"""Registry entry and harness cases of Bayesian nested networks (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.nested_dropout:NestedDropoutTrainerMixin"
CONVERT = "hf_regtools.nested_dropout:convert_to_nested"


def _case(model: str, **options) -> dict:
    # masks and weight noise are sampled (torch RNG), and BatchNorm normalizes per process: 2 processes != 1
    return {"model": model, "surgery": (CONVERT, {"num_div": 4, "freeze": 1, **options}), "callbacks": [],
            "mixin": MIXIN, "trainer_init_kwargs": {"kl_weight": 1e-3}, "deterministic": False}


register(
    TechniqueInfo(
        name="nested_dropout",
        title="Bayesian nested networks (variational nested dropout)",
        paper="Cui et al., Bayesian Nested Neural Networks for Uncertainty Calibration and Adaptive Compression, "
              "CVPR 2021",
        arxiv="2101.11353",
        code_repo="ralphc1212/variational_nested_dropout",
        functional=CONVERT,
        mixin=MIXIN,
        harness={"cases": {
            "vgg": _case("vgg_classifier", prior_pi=0.95),
            "timm_resnet": _case("timm_resnet_classifier"),
            "transformers_resnet_official_sampler": _case("transformers_resnet", sampler_logits="prob"),
        }},
    )
)
