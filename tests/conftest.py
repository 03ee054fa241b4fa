"""Shared fixtures. Real data lives in ../shared/data (read in place); tests needing it skip when absent."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR8K = SHARED / "flickr8k-1k"
COCO = SHARED / "coco-mini"

needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason="../shared/data absent")
needs_coco = pytest.mark.skipif(not (COCO / "annotations").is_dir(), reason="../shared/data absent")

# A loaded 2-core CI box can take more than Ray's default 30 s to register a local raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(autouse=True, scope="module")
def _ray_ends_with_its_module():
    """Each test module gets its own Ray: one left initialised would be silently reused by the next module."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
