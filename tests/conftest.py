"""Shared test set-up: one torch thread and a fixed seed for every test.

One thread: the tests run small tensors, and on a shared 2-core machine several threads per
process spend more time waiting on each other than computing.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so results do not depend on test order."""
    torch.manual_seed(0)

