"""Registry entry and harness cases of early/late dropout and stochastic depth (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

CALLBACKS = ("EarlyDropoutCallback", "LateDropoutCallback", "EarlyStochasticDepthCallback",
             "LateStochasticDepthCallback")


def _case(model: str, model_kwargs: dict, callback: str, **settings) -> dict:
    return {"model": model, "model_kwargs": model_kwargs,
            "callbacks": [(f"hf_regtools.dropout_schedules:{callback}", settings)], "deterministic": False}


register(
    TechniqueInfo(
        name="dropout_schedules",
        title="Early/late dropout and stochastic depth",
        paper="Liu et al., Dropout Reduces Underfitting, ICML 2023",
        arxiv="2303.01500",
        code_repo="facebookresearch/dropout",
        functional="hf_regtools.dropout_schedules:DropRateController",
        callback="hf_regtools.dropout_schedules:DropScheduleCallback",
        callbacks=tuple(f"hf_regtools.dropout_schedules:{name}" for name in CALLBACKS),
        harness={"cases": {
            "early_dropout": _case("transformers_vit", {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2},
                                   "EarlyDropoutCallback", p=0.3, cutoff_steps=3),
            "late_stochastic_depth": _case("transformers_convnext", {}, "LateStochasticDepthCallback", p=0.5,
                                           cutoff_steps=2),
            "early_dropout_timm_vit": _case("timm_wrapped_vit", {"proj_drop_rate": 0.2, "attn_drop_rate": 0.2},
                                            "EarlyDropoutCallback", p=0.3, cutoff_steps=3),
            "late_stochastic_depth_timm_convnext": _case("timm_convnext_classifier", {},
                                                         "LateStochasticDepthCallback", p=0.5, cutoff_steps=2),
        }},
    )
)
