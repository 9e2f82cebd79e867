"""Registry entry and harness cases of label-noise SGD (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.label_noise:LabelNoiseTrainerMixin"

# The noise of an example depends on (seed, step, its row in the step's global batch) only, so the cases without
# dropout are "deterministic": 2 processes with batch 4 equal 1 process with batch 8, and the MLP's batch 8 equals
# 4 x 2 accumulation steps. The ViT trains with SGD: AdamW turns the summation-order differences of the 2-process
# gradient reduction (1e-7) on near-zero gradients into 1e-6 weight differences (transformers 4.57). The BERT text
# fixture has dropout (0.1), so its 2 processes only agree with each other.
register(
    TechniqueInfo(
        name="label_noise",
        title="Label-noise SGD",
        paper="Damian, Ma and Lee, Label Noise SGD Provably Prefers Flat Global Minimizers, NeurIPS 2021",
        arxiv="2106.06530",
        code_repo="",
        functional="hf_regtools.label_noise:label_noise_loss_value",
        callback="hf_regtools.label_noise:LabelNoiseLoss",
        mixin=MIXIN,
        domains=("vision", "text"),
        harness={"cases": {
            "mlp_flip": {
                "model": "mlp_classifier", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"label_noise": {"kind": "flip", "p": 0.5, "num_classes": 3}},
                "deterministic": True, "accumulation_equivalent": True},
            "timm_convnext_soft_mse": {
                "model": "timm_convnext_classifier", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"label_noise": {"kind": "soft_mse", "sigma": 0.5, "num_classes": 3,
                                                        "noise": "gaussian"}},
                "deterministic": True},
            "transformers_vit_flip": {
                "model": "transformers_vit", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"label_noise": {"kind": "flip", "p": 0.3, "num_classes": 3, "seed": 7}},
                "trainer_kwargs": {"optim": "sgd", "learning_rate": 0.05}, "deterministic": True},
            "bert_text_flip": {
                "model": "transformers_bert", "callbacks": [], "mixin": MIXIN,
                "trainer_init_kwargs": {"label_noise": {"kind": "flip", "p": 0.3, "num_classes": 3}},
                "deterministic": False},
        }},
    )
)
