import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/networks.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "threads(n): run the marked tests with at most n torch threads")


@pytest.fixture(autouse=True)
def _threads(request):
    # Small convolutions oversubscribe OpenMP on a shared 2-core machine; files cap it with
    # ``pytestmark = pytest.mark.threads(n)``.
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, marker.args[0]))
    yield
    torch.set_num_threads(threads)
