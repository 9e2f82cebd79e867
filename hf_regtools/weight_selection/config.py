"""Settings of weight selection, as a dataclass (also drives the `hf-regtools select` options)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SELECTION_MODES = ("uniform", "consecutive", "random", "importance")
QKV_MODES = ("per_chunk", "fused")
SKIP_RULES = ("classifier", "official")
DEFAULT_CALIBRATION_SAMPLES = 256
CALIBRATION_FIELDS = ("calibration_data", "calibration_split", "calibration_samples", "calibration_batch_size")


@dataclass
class WeightSelectionConfig:
    """How to select the student's weights from the teacher's (see `select_weights`)."""

    mode: str = field(default="uniform", metadata={
        "help": f"element selection: one of {SELECTION_MODES} (random keeps consistency: one index set per axis; "
                "importance keeps the channels, neurons and heads of highest mean activation on calibration data, "
                "as weight subcloning and Minitron)",
        "choices": SELECTION_MODES})
    qkv_mode: str = field(default="per_chunk", metadata={
        "help": "fused qkv tensors: select each q/k/v chunk on its own (per_chunk), or the stacked tensor as a "
                "whole like the official code (fused)", "choices": QKV_MODES})
    skip: str = field(default="classifier", metadata={
        "help": "keys left at their initialization: the classifier only (classifier), or every key containing "
                "'head' like the official code (official)", "choices": SKIP_RULES})
    keep_classifier: bool = field(default=False, metadata={
        "help": "also select the classifier (teacher and student must have the same number of classes)"})
    reshape_1x1: bool = field(default=False, metadata={
        "help": "let Linear weights initialize 1x1 convolutions and back (timm ConvNeXt conv_mlp)"})
    seed: int = field(default=0, metadata={"help": "seed of the random selection mode"})
    layers: str = field(default="first", metadata={
        "help": "which teacher blocks the student's blocks read: first (the paper's first-N), last, even (evenly "
                "spaced), importance (the blocks of highest Block Influence on calibration data, ShortGPT), or "
                "teacher block indices such as 0,2,5 (one list per stage separated by ';' for staged families: "
                "0,1;0,2;0,3,5;0,1)"})
    calibration_data: str | None = field(default=None, metadata={
        "help": "calibration data of mode/layers importance: a datasets save_to_disk folder or a Hub dataset id, "
                "whose columns are the teacher's inputs (pixel_values; input_ids and attention_mask); the whole "
                "teacher is loaded in memory for its forward passes"})
    calibration_split: str | None = field(default=None, metadata={
        "help": "split of the calibration data (none given: train, or a saved Dataset as it is)"})
    calibration_samples: int = field(default=DEFAULT_CALIBRATION_SAMPLES, metadata={
        "help": "calibration examples to use at most"})
    calibration_batch_size: int = field(default=8, metadata={"help": "calibration examples per forward pass"})

    @property
    def uses_calibration(self) -> bool:
        """Whether element or layer selection is by importance on calibration data."""
        return self.mode == "importance" or self.layers == "importance"

    def to_dict(self) -> dict:
        return asdict(self)

    def selection_kwargs(self) -> dict:
        """The keyword arguments of `select_weights` (the settings but the calibration data's)."""
        return {name: value for name, value in asdict(self).items() if name not in CALIBRATION_FIELDS}
