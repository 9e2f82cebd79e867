"""GPT-2 in transformers (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`): learned position embeddings,
LayerNorm, and `Conv1D` layers, whose weights are stored `[in, out]` (the transpose of `nn.Linear`).

Axes: `hidden` for the residual stream (token and position embeddings, every LayerNorm, every projection's input or
output on the stream, `lm_head`, `score`); the fused `c_attn` output as q | k | v, each heads x head dimension
(`3*heads{layer}*head_dim`, outermost first, as GPT-2 splits it), so selection keeps whole heads and the same heads in
the q, k and v blocks; one set of heads per layer, one `head_dim` set and one `mlp{layer}` set per layer. The
vocabulary and position axes are never selected. Old checkpoints also store each layer's causal mask (`attn.bias`)
and masking constant (`attn.masked_bias`): buffers, not weights, named here only so that they pass unchanged.
"""

from __future__ import annotations

from .. import ModelFamily, UnsupportedModelError

_LAYER = r"(^|\.)h\.(?P<layer>\d+)\."
_HEADS = "heads{layer}*head_dim"


def _conv1d(pattern: str, into: str | None, out: str | None) -> tuple[tuple[str, tuple], ...]:
    """Axis rules of a transformers `Conv1D` layer's weight `[in, out]` and bias `[out]`."""
    return (pattern + r"\.weight$", (into, out)), (pattern + r"\.bias$", (out,))


def attention_sizes(config) -> dict[str, int]:
    """Heads and head dimension of a GPT-2 config (`n_head`, `n_embd // n_head`).

    Raises:
        `UnsupportedModelError`: the config is of another model type with GPT-2's key names (GPTBigCode stores
            `nn.Linear` `[out, in]` weights and may share one key/value head), which these axes do not describe.
    """
    model_type = getattr(config, "model_type", "gpt2")
    if model_type != "gpt2":
        raise UnsupportedModelError(f"transformers {model_type} has GPT-2's key names but not its layout (Conv1D "
                                    "weights [in, out], one key/value head per query head); weight selection "
                                    "supports GPT-2 itself (model_type 'gpt2')")
    return {"heads": config.n_head, "head_dim": config.n_embd // config.n_head}


GPT2 = ModelFamily(
    library="transformers", name="gpt2", layout="gpt2",
    signature=(_LAYER + r"attn\.c_attn\.weight$", _LAYER + r"mlp\.c_fc\.weight$", r"(^|\.)wte\.weight$",
               r"(^|\.)wpe\.weight$"),
    classifier=("score.",),
    axes=(
        (r"(^|\.)(wte|wpe)\.weight$", (None, "hidden")),
        (r"^(lm_head|score)\.weight$", (None, "hidden")),
        (r"(^|\.)(ln_1|ln_2|ln_f)\.(weight|bias)$", ("hidden",)),
        *_conv1d(_LAYER + r"attn\.c_attn", "hidden", "3*" + _HEADS),
        *_conv1d(_LAYER + r"attn\.c_proj", _HEADS, "hidden"),
        *_conv1d(_LAYER + r"mlp\.c_fc", "hidden", "mlp{layer}"),
        *_conv1d(_LAYER + r"mlp\.c_proj", "mlp{layer}", "hidden"),
        (_LAYER + r"attn\.bias$", (None, None, None, None)),
        (_LAYER + r"attn\.masked_bias$", ()),
    ),
    layers=_LAYER,
    factor_sizes=attention_sizes,
    tied=((r"^lm_head\.weight$", "transformer.wte.weight"),),
)

FAMILIES: tuple[ModelFamily, ...] = (GPT2,)
