"""Fixed seed and one intra-op thread for every model test.

The model tests use tiny tensors, for which one thread is fastest; on a busy 2-core machine
two OpenMP threads per op can make a step 30 times slower. The thread count is restored after
each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
