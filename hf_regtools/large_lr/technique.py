"""Registry entry and harness cases of the large initial learning rate (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.large_lr:LargeLRTrainerMixin"
NOISE = "hf_regtools.large_lr:ActivationNoiseCallback"
# Milestones in steps, so that the 4-step resume test crosses them (decay at step 2, noise off from step 3).
SCHEDULE = {"large_lr": {"milestones": (2,), "factors": (0.04,), "unit": "steps"}}


def _case(model, sites, deterministic, **extra):
    return {"model": model, "mixin": MIXIN, "trainer_init_kwargs": SCHEDULE,
            "callbacks": [(NOISE, {"std": 0.4, "anneal": (3,), "factor": 1e-5, "unit": "steps", "sites": sites})],
            "trainer_kwargs": {"optim": "sgd", "learning_rate": 0.1}, "deterministic": deterministic, **extra}


# The shared noise map is the same in every process; BatchNorm statistics are per process, so the ResNet's 2
# processes only agree with each other; the ViT (no dropout) equals 1 process; the BERT fixture has dropout.
register(
    TechniqueInfo(
        name="large_lr",
        title="Large initial learning rate",
        paper="Li, Wei and Ma, Towards Explaining the Regularization Effect of Initial Large Learning Rate in Training "
              "Neural Networks, NeurIPS 2019",
        arxiv="1907.04595",
        code_repo="cwein3/large-lr-code",
        functional="hf_regtools.large_lr:large_initial_lr_lambda",
        callback=NOISE,
        callbacks=("hf_regtools.large_lr:PatchEpochCallback",),
        mixin=MIXIN,
        domains=("vision", "text"),
        harness={"cases": {
            "timm_resnet_bn_noise": _case("timm_resnet_classifier", "batchnorm", False),
            "transformers_vit_intermediate_noise": _case("transformers_vit", ("intermediate.dense", "mlp.fc1"), True),
            "bert_text_intermediate_noise": _case("transformers_bert", ("intermediate.dense",), False),
        }},
    )
)
