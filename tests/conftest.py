from __future__ import annotations

from pathlib import Path

import pytest
import torch

import detrkit

FIXTURES = Path(__file__).parent / "fixtures"

TINY = dict(
    backbone="resnet18",
    hidden_dim=32,
    nheads=4,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=8,
    num_classes=3,
    image_size=64,
    max_size=96,
)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads():
    # Tests run on 2 cores; keep intra-op threads at what the machine has.
    torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model(**overrides) -> detrkit.Detector:
    torch.manual_seed(0)
    return detrkit.build(**{**TINY, **overrides})
