"""Shared fixtures for the unit tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lite1_backbone():
    """The default backbone with its embedded ImageNet weights (built once: a few seconds)."""
    from simsearch.backbones import build_backbone

    return build_backbone("tf_efficientnet_lite1", "embedded", (2, 3))
