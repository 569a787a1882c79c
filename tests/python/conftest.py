import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("LUTMM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))


def has_gpu():
    import lutmm
    return lutmm.gpu_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU test skipped")


@pytest.fixture
def shared_dir():
    if not os.path.isdir(os.path.join(SHARED, "models", "mini-llama")):
        pytest.skip(f"shared assets not found at {SHARED}")
    return SHARED
