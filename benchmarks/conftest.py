import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a benchmark on one torch thread, restoring the caller's count afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
