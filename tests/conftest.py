import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/networks.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
