"""Decoder language models of the Llama layout in transformers: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k
norms) and the other families with q/k/v/o and gate/up/down projections, RMSNorm and rotary position embeddings.

Axes: `hidden` for the residual stream (embeddings, every norm, every projection's input or output on the stream,
`lm_head`); attention heads as key/value heads x query heads per group x head dimension, outermost first, as
transformers' `repeat_kv` orders them (query head `h` reads key/value head `h // group`), so selection keeps whole
heads, each student query head within the group of its key/value head; one set of key/value heads and group members
per layer (`kv_heads{layer}`, `group{layer}`), one `head_dim` set (selected in rotary pairs) and one `mlp{layer}` set
per layer. The vocabulary axis is never selected.
"""

from __future__ import annotations

from .. import ModelFamily, _linear

_LAYER = r"(^|\.)layers\.(?P<layer>\d+)\."
_QUERY = "kv_heads{layer}*group{layer}*head_dim"
_KEY_VALUE = "kv_heads{layer}*head_dim"


def attention_sizes(config) -> dict[str, int]:
    """Query heads per key/value head (`group`), key/value heads and head dimension of a Llama-layout config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"kv_heads": kv_heads, "group": heads // kv_heads, "head_dim": head_dim}


LLAMA = ModelFamily(
    library="transformers", name="llama", layout="llama",
    signature=(_LAYER + r"self_attn\.q_proj\.weight$", _LAYER + r"mlp\.gate_proj\.weight$",
               r"(^|\.)embed_tokens\.weight$"),
    classifier=("score.",),
    attention_dropout=("attention_dropout",),
    axes=(
        (r"(^|\.)embed_tokens\.weight$", (None, "hidden")),
        *_linear(r"^(lm_head|score)", None, "hidden"),
        *_linear(_LAYER + r"self_attn\.q_proj", _QUERY, "hidden"),
        *_linear(_LAYER + r"self_attn\.(k_proj|v_proj)", _KEY_VALUE, "hidden"),
        *_linear(_LAYER + r"self_attn\.o_proj", "hidden", _QUERY),
        (_LAYER + r"self_attn\.(q_norm|k_norm)\.weight$", ("head_dim",)),
        *_linear(_LAYER + r"mlp\.(gate_proj|up_proj)", "mlp{layer}", "hidden"),
        *_linear(_LAYER + r"mlp\.down_proj", "hidden", "mlp{layer}"),
        (r"", ("hidden",)),
    ),
    layers=_LAYER,
    factor_sizes=attention_sizes,
    paired_factors=("head_dim",),
    tied=((r"^lm_head\.weight$", "model.embed_tokens.weight"),),
)

FAMILIES: tuple[ModelFamily, ...] = (LLAMA,)
