"""Registry entry and harness cases of GradInit (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

CALLBACK = "hf_regtools.gradinit:GradInitCallback"
AGD = "hf_regtools.optim:AGD"


def _case(model: str, **settings) -> dict:
    return {"model": model, "callbacks": [(CALLBACK, {"iterations": 3, **settings})], "deterministic": False}


register(
    TechniqueInfo(
        name="gradinit",
        title="GradInit",
        paper="Zhu et al., GradInit: Learning to Initialize Neural Networks for Stable and Efficient Training, "
              "NeurIPS 2021",
        arxiv="2102.08098",
        code_repo="zhuchen03/gradinit",
        functional="hf_regtools.gradinit:gradinit_",
        callback=CALLBACK,
        callbacks=("hf_regtools.optim:AGDMetricsCallback",),
        optimizer=AGD,
        cli_command="gradinit",
        domains=("vision", "text"),
        harness={"cases": {
            "transformers_resnet_bn": _case("transformers_resnet"),
            "timm_resnet_reference_modules": _case("timm_resnet_classifier", module_types="reference", gamma=0.5),
            "transformers_bert_adam": _case("transformers_bert", algorithm="adam", inner_lr=1e-3, gamma=1000.0),
            "agd_bias_free_mlp": {"model": "mlp_classifier", "optimizer": (AGD, {}),
                                  "callbacks": [("hf_regtools.optim:AGDMetricsCallback", {})],
                                  "trainer_kwargs": {"max_grad_norm": 0.0, "lr_scheduler_type": "constant"},
                                  "deterministic": True},
        }},
    )
)
