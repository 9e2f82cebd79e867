"""Registry entry and harness cases of alpha-SVRG (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.alpha_svrg:AlphaSVRGTrainerMixin"
CASES = (("snapshot_every_2_steps", {"snapshot_every": 2}, 0.0),
         ("full_gradient_in_batches_of_16", {"snapshot_every": 2, "full_gradient_batch_size": 16}, 0.0),
         ("cache_mode", {"mode": "cache"}, 0.0),
         ("cache_mode_with_dropout", {"mode": "cache"}, 0.1))

register(
    TechniqueInfo(
        name="alpha_svrg",
        title="alpha-SVRG",
        paper="Yin et al., A Coefficient Makes SVRG Effective, ICLR 2025",
        arxiv="2311.05589",
        code_repo="davidyyd/alpha-SVRG",
        functional="hf_regtools.schedules:svrg_alpha_schedule",
        optimizer="hf_regtools.alpha_svrg:AlphaSVRG",
        mixin=MIXIN,
        harness={"cases": {
            name: {"model": "transformers_vit", "callbacks": [], "mixin": MIXIN,
                   "model_kwargs": {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
                   "trainer_init_kwargs": {"alpha_svrg": {"alpha0": 0.75, **settings}},
                   "trainer_kwargs": {"max_grad_norm": 0.0, "optim": "sgd", "learning_rate": 0.05},
                   "deterministic": dropout == 0.0}
            for name, settings, dropout in CASES
        }},
    )
)
