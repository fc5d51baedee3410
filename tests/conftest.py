from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import detrkit

FIXTURES = Path(__file__).parent / "fixtures"

TINY = dict(
    backbone="resnet18",
    hidden_dim=32,
    num_heads=4,
    enc_layers=1,
    dec_layers=2,
    ffn_dim=64,
    num_queries=8,
    num_classes=3,
    image_size=64,
    max_size=96,
)


_KERNEL_CACHE = pytest.StashKey[tuple[str, "str | None"]]()


def pytest_configure(config):
    # Tests never write into the user's cache: native kernels build once per session into a temporary folder
    # (detrkit.kernels honours DETRKIT_CACHE_DIR). A hook, not a session fixture, because test modules load the
    # kernel while they are collected (test_deformable_attention's `needs_kernel`), before any fixture runs; the
    # environment also reaches the tests' subprocesses.
    cache = tempfile.mkdtemp(prefix="detrkit-test-cache-")
    config.stash[_KERNEL_CACHE] = (cache, os.environ.get("DETRKIT_CACHE_DIR"))
    os.environ["DETRKIT_CACHE_DIR"] = cache


def pytest_unconfigure(config):
    cache, previous = config.stash[_KERNEL_CACHE]
    if previous is None:
        os.environ.pop("DETRKIT_CACHE_DIR", None)
    else:
        os.environ["DETRKIT_CACHE_DIR"] = previous
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def kernel_cache() -> Path:
    """The session's temporary kernel cache folder (``$DETRKIT_CACHE_DIR``)."""
    return Path(os.environ["DETRKIT_CACHE_DIR"])


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
