"""Shared pytest setup: hardware marks skip cleanly when the device is absent."""

import os

import pytest

# Tests run on the CPU unless a hardware-marked run asks for more.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _has_platform(name: str) -> bool:
    try:
        import jax

        return any(d.platform == name for d in jax.devices())
    except Exception:  # noqa: BLE001 - no backend of that kind at all
        return False


def pytest_collection_modifyitems(config, items):
    del config
    have: dict[str, bool] = {}
    for item in items:
        for platform in ("gpu", "tpu"):
            if platform in item.keywords:
                if platform not in have:
                    have[platform] = _has_platform(platform)
                if not have[platform]:
                    item.add_marker(pytest.mark.skip(reason=f"needs a {platform.upper()}"))
