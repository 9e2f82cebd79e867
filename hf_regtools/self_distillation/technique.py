"""Registry entry and harness cases of self-distillation (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.self_distillation:DistillationTrainerMixin"
TEACHER = "hf_regtools.self_distillation.harness:teacher_kwargs"

# Each case distills from a tiny teacher built by `teacher_kwargs` (the generic "trainer_init_factory" key): the
# student's own architecture from another seed (self-distillation), or a wider model (knowledge distillation). The ViTs
# have no dropout and no BatchNorm, so 2 processes equal 1 and batch 8 equals 4 x 2 accumulation steps (the
# distillation term is normalized as the Trainer's own loss); BERT has dropout.
register(
    TechniqueInfo(
        name="self_distillation",
        title="Self-distillation",
        paper="Mobahi, Farajtabar and Bartlett, Self-Distillation Amplifies Regularization in Hilbert Space, "
              "NeurIPS 2020",
        arxiv="2002.05715",
        code_repo="",
        functional="hf_regtools.self_distillation:kernel_self_distillation",
        mixin=MIXIN,
        domains=("vision", "text"),
        harness={"cases": {
            "timm_vit_kl_mixed": {
                "model": "timm_wrapped_vit", "callbacks": [], "mixin": MIXIN,
                "trainer_init_factory": (TEACHER, {"distillation": {"loss": "kl", "temperature": 2.0, "alpha": 0.3}}),
                "deterministic": True, "accumulation_equivalent": True},
            "transformers_vit_mse_from_wider_teacher": {
                "model": "transformers_vit", "callbacks": [], "mixin": MIXIN,
                "trainer_init_factory": (TEACHER, {"model_kwargs": {"hidden_size": 32, "intermediate_size": 64},
                                                   "distillation": {"loss": "mse"}}),
                "deterministic": True, "accumulation_equivalent": True},
            "bert_text_kl": {
                "model": "transformers_bert", "callbacks": [], "mixin": MIXIN,
                "trainer_init_factory": (TEACHER, {"distillation": {"loss": "kl", "temperature": 4.0}}),
                "deterministic": False},
        }},
    )
)
