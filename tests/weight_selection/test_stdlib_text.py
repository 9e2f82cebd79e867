"""Small real-data reproduction for text: a decoder student cut from a teacher trained on the standard library's
source code reaches a lower validation loss than the same student from random init after the same steps.

The teacher (a Llama-layout decoder, 64 wide, 4 layers, grouped-query attention) is trained on byte tokens of half
the standard library's top-level modules; the students (32 wide, 2 layers) train on the same text and are evaluated
on the other half. Measured (3 seeds): validation loss after 100 steps 2.50 (selection) vs 2.68 (random init);
before training 3.57 vs 5.55; the teacher's 2.46.
"""

import statistics

import pytest
import torch

from hf_regtools.testing.stdlib_text import VOCAB_SIZE, causal_lm_loss, stdlib_tokens, train_causal_lm
from hf_regtools.testing.tiny_models import transformers_llama
from hf_regtools.weight_selection import select_weights

SEEDS = (0, 1, 2)


def decoder(width, layers, heads, kv_heads):
    return transformers_llama(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, intermediate_size=2 * width, vocab_size=VOCAB_SIZE)


@pytest.mark.slow
def test_weight_selection_beats_random_init_on_standard_library_source():
    train, validation = stdlib_tokens("train"), stdlib_tokens("validation", max_bytes=200_000)
    torch.manual_seed(0)
    teacher = decoder(64, 4, 4, 2)
    train_causal_lm(teacher, train, steps=300, seed=0)
    assert causal_lm_loss(teacher, validation) < 2.6

    results = {"selected": [], "random": []}
    for seed in SEEDS:
        for init in results:
            torch.manual_seed(100 + seed)
            student = decoder(32, 2, 2, 1)
            if init == "selected":
                select_weights(teacher, student)
            train_causal_lm(student, train, steps=100, seed=seed)
            results[init].append(causal_lm_loss(student, validation))
    mean = {init: statistics.mean(losses) for init, losses in results.items()}
    assert mean["selected"] < mean["random"] - 0.1, results
