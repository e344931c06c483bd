"""One intra-op thread for every parity test, as ``regenerate.py`` computed the reference numbers.

AND-mask and SAND-mask keep a parameter's update only where the domains' gradient signs agree; a BatchNorm bias
whose gradient is ~1e-9 takes its sign from the summation order, which the thread count changes. With the same
single thread on both sides the comparison is of the rule, not of a reduction order."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
