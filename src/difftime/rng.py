"""Independent random streams derived from one seed."""

from __future__ import annotations

import numpy as np


def stream_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seeds for the training and evaluation randomness of one ``seed``."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)
