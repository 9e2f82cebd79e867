"""Registry entry of weight selection (see `hf_regtools._registry`)."""

from .._registry import TechniqueInfo, register

register(
    TechniqueInfo(
        name="weight_selection",
        title="Weight selection",
        paper="Xu et al., Initializing Models with Larger Ones, ICLR 2024",
        arxiv="2311.18823",
        code_repo="OscarXZQ/weight-selection",
        functional="hf_regtools.weight_selection:select_weights",
        cli_command="select",
    )
)
