"""The Python standard library's own source files as a byte-level language-modelling corpus, and a tiny trainer.

Every Python installation ships these files, so text demos and small reproductions run offline. The tokens are the
files' bytes (a vocabulary of 256), so no tokenizer is trained or downloaded. The top-level modules of the standard
library are split by file: every other file (in name order) is training text, the rest validation text.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 256
SPLITS = ("train", "validation")


def stdlib_files(split: str) -> list[Path]:
    """The standard library's top-level `.py` files of one split (`"train"` or `"validation"`), in name order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return files[SPLITS.index(split)::2]


def stdlib_tokens(split: str, *, max_bytes: int = 2_000_000) -> torch.Tensor:
    """The first `max_bytes` bytes of a split's files, concatenated, as a 1-D `int64` tensor of token ids."""
    data = bytearray()
    for path in stdlib_files(split):
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    return torch.frombuffer(data[:max_bytes], dtype=torch.uint8).long()


def stdlib_dataset(split: str, *, sequence_length: int = 64, max_sequences: int | None = None,
                   max_bytes: int = 2_000_000):
    """A split as a `datasets.Dataset` of non-overlapping `input_ids` windows with `labels` (a copy, for causal LMs,
    which shift labels themselves)."""
    from datasets import Dataset

    tokens = stdlib_tokens(split, max_bytes=max_bytes)
    windows = tokens[:len(tokens) // sequence_length * sequence_length].view(-1, sequence_length)
    if max_sequences is not None:
        windows = windows[:max_sequences]
    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def train_causal_lm(model: torch.nn.Module, tokens: torch.Tensor, *, steps: int, batch_size: int = 16,
                    sequence_length: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train a transformers causal LM with AdamW on random windows of `tokens`; returns every step's loss."""
    from .digits import adamw_steps

    generator = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(steps):
            starts = torch.randint(0, len(tokens) - sequence_length, (batch_size,), generator=generator)
            yield torch.stack([tokens[start:start + sequence_length] for start in starts.tolist()])

    return adamw_steps(model, batches(), lambda batch: model(input_ids=batch, labels=batch).loss, lr=lr,
                       weight_decay=0.0)


@torch.no_grad()
def causal_lm_loss(model: torch.nn.Module, tokens: torch.Tensor, *, sequence_length: int = 64,
                   max_sequences: int = 64) -> float:
    """Mean next-token cross-entropy of `model` over the first `max_sequences` windows of `tokens`."""
    model.eval()
    windows = tokens[:len(tokens) // sequence_length * sequence_length].view(-1, sequence_length)[:max_sequences]
    return model(input_ids=windows, labels=windows).loss.item()
