"""Registry entry and harness cases of StochNorm (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register


def _case(model: str, **settings) -> dict:
    # batch statistics are per process (as with BatchNorm), so 2 processes do not equal 1 on the global batch
    return {"model": model, "callbacks": [("hf_regtools.stochnorm:StochNormCallback", settings)],
            "deterministic": False}


register(
    TechniqueInfo(
        name="stochnorm",
        title="StochNorm",
        paper="Kou et al., Stochastic Normalization, NeurIPS 2020",
        arxiv="",
        code_repo="thuml/StochNorm",
        functional="hf_regtools.stochnorm:apply_stochnorm",
        callback="hf_regtools.stochnorm:StochNormCallback",
        harness={"cases": {
            "transformers_resnet": _case("transformers_resnet", p=0.5),
            "timm_resnet": _case("timm_resnet_classifier", p=0.3, exclude=r"^backbone\.bn1$"),
        }},
    )
)
