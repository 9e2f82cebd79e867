"""Assertions for tests of model round trips."""

from __future__ import annotations

import torch


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    """Both models have the same state-dict keys and bit-identical tensors; the message names the first that differs."""
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert expected_sd.keys() == actual_sd.keys(), sorted(set(expected_sd) ^ set(actual_sd))
    for key, tensor in expected_sd.items():
        assert torch.equal(tensor, actual_sd[key]), key
