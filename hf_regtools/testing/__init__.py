"""Test utilities shipped for downstream users: a loopback fake Hub, an offline HF cache builder, tiny models and
the scikit-learn digits as a `datasets.Dataset`."""
