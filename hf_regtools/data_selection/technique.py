"""Registry entry and harness cases of pre-training data selection + two-head fine-tuning (see
`hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

MIXIN = "hf_regtools.data_selection:TwoStreamTrainerMixin"
SOURCE_DATASET_SIZE = 27  # not a multiple of the source batch (8, or 4 per process): 3 batches per cycle


def harness_trainer_kwargs(case: dict, *, size: int = SOURCE_DATASET_SIZE, num_labels: int = 5, **settings) -> dict:
    """`two_stream=` for a harness case: a synthetic source dataset of the case's inputs with `num_labels` classes."""
    from ..testing.harness import dataset

    return {"two_stream": {**settings, "source_dataset": dataset(case, size, seed=1, num_labels=num_labels)}}


SURGERY = ("hf_regtools.data_selection:TwoHeadModel", {"n_target": 3, "n_source": 5})
FACTORY = "hf_regtools.data_selection.technique:harness_trainer_kwargs"

# Both ResNets have BatchNorm over the mixed target + source batch ("deterministic": False). The source stream cycles
# within the 4 steps of the resume test (27 examples in batches of 8: 3 per cycle), so a resume must restore its
# position and the cycle's order.
register(
    TechniqueInfo(
        name="data_selection",
        title="Data selection by UOT + two-head fine-tuning",
        paper="Liu, Xu, Xu, Qian, Li, Ji, Chan and Jin, Improved Fine-Tuning by Better Leveraging Pre-Training Data, "
              "NeurIPS 2022",
        arxiv="2111.12292",
        code_repo="ziquanliu/NeurIPS2022_UOT_fine_tuning",
        functional="hf_regtools.data_selection:uot_select_classes",
        mixin=MIXIN,
        cli_command="select-data",
        harness={"cases": {
            "timm_resnet_two_heads": {
                "model": "timm_resnet_classifier", "surgery": SURGERY, "callbacks": [], "mixin": MIXIN,
                "trainer_init_factory": (FACTORY, {"mu": 1.0, "lambda_u": 0.3, "head_lr_mult": 10.0}),
                "deterministic": False},
            "transformers_resnet_two_heads": {
                "model": "transformers_resnet", "surgery": SURGERY, "callbacks": [], "mixin": MIXIN,
                "trainer_init_factory": (FACTORY, {"mu": 1.0, "lambda_u": 0.3, "lr_milestones": [1, 2]}),
                "deterministic": False},
        }},
    )
)
