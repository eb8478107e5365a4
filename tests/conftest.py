"""Test setup: GPU-only tests are marked `cuda` and skip without a GPU; without a GPU the Triton
kernels run on the CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported)."""
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN = Path(__file__).parent / "golden"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_unet():
    return torch.load(GOLDEN / "adm_unet_a.pt", weights_only=True)


@pytest.fixture(scope="session")
def golden_diffusion():
    return torch.load(GOLDEN / "adm_diffusion_a.pt", weights_only=True)
