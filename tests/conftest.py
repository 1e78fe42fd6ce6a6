import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: tiny networks run fastest so, and in-process builds then match the
    single-threaded subprocesses that the determinism tests compare them with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
