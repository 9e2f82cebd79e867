"""BERT-style encoders in transformers: BERT and RoBERTa (and the models saved under their prefixes, such as
XLM-RoBERTa and CamemBERT), with a sequence-classification, masked-LM or pre-training head.

Axes: `hidden` for the residual stream (the word, position and token-type embeddings, every LayerNorm, every
projection's input or output on the stream, the pooler and the masked-LM transform); attention heads as heads x head
dimension, outermost first, so selection keeps whole heads, the same ones in query, key, value and the attention
output (`heads{layer}`, one set per layer; one `head_dim` set, the teacher's head dimension by default so it stays
whole); one `mlp{layer}` set per layer. The vocabulary, positions, token types and classes are never selected; the
masked-LM decoder is tied to the word embeddings.

The classification head, re-initialized by default like every family's, is what sits on the encoder's output: BERT's
pooler and classifier, RoBERTa's `classifier.dense` and `classifier.out_proj`; so a masked-LM teacher (which has no
pooler) gives a sequence classifier too.
"""

from __future__ import annotations

from dataclasses import replace

from .. import ModelFamily, _linear

_LAYER = r"(^|\.)encoder\.layer\.(?P<layer>\d+)\."
_HEADS = "heads{layer}*head_dim"


def attention_sizes(config) -> dict[str, int]:
    """Heads and head dimension of a BERT-style config."""
    return {"heads": config.num_attention_heads, "head_dim": config.hidden_size // config.num_attention_heads}


def _signature(prefix: str) -> tuple[str, ...]:
    return (rf"^{prefix}encoder\.layer\.\d+\.attention\.self\.query\.weight$",
            rf"^{prefix}embeddings\.token_type_embeddings\.weight$")


_AXES = (
    (r"(^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$", (None, "hidden")),
    *_linear(_LAYER + r"attention\.self\.(query|key|value)", _HEADS, "hidden"),
    *_linear(_LAYER + r"attention\.output\.dense", "hidden", _HEADS),
    *_linear(_LAYER + r"intermediate\.dense", "mlp{layer}", "hidden"),
    *_linear(_LAYER + r"output\.dense", "hidden", "mlp{layer}"),
    *_linear(r"^(cls\.predictions|lm_head)\.decoder", None, "hidden"),
    (r"^(cls\.predictions|lm_head)\.bias$", (None,)),
    *_linear(r"^cls\.seq_relationship", None, "hidden"),
    *_linear(r"^classifier\.out_proj", None, "hidden"),
    *_linear(r"^classifier", None, "hidden"),
    (r"", ("hidden", "hidden")),
    (r"", ("hidden",)),
)

BERT = ModelFamily(
    library="transformers", name="bert", layout="bert",
    signature=_signature(r"(bert\.)?"),
    classifier=("bert.pooler.", "pooler.", "classifier."),
    head_dropout=r"^dropout$",
    attention_dropout=("dropout_prob",),
    axes=_AXES,
    layers=_LAYER,
    factor_sizes=attention_sizes,
    tied=((r"^cls\.predictions\.decoder\.weight$", "bert.embeddings.word_embeddings.weight"),
          (r"^cls\.predictions\.decoder\.bias$", "cls.predictions.bias")),
)
ROBERTA = replace(
    BERT, name="roberta", signature=_signature(r"roberta\."), classifier=("classifier.",),
    head_dropout=r"^classifier\.dropout$",
    tied=((r"^lm_head\.decoder\.weight$", "roberta.embeddings.word_embeddings.weight"),
          (r"^lm_head\.decoder\.bias$", "lm_head.bias")),
)

FAMILIES: tuple[ModelFamily, ...] = (BERT, ROBERTA)
