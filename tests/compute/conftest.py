"""Fixtures the compute tests share."""

import pytest

from mlx_dpo.compute.kernel import load_kernel


@pytest.fixture(scope="session")
def kernel():
    """The decode kernel built for this machine; the test is skipped where it cannot be."""
    built, why = load_kernel()
    if built is None:
        pytest.skip(f"no kernel on this machine: {why}")
    return built
