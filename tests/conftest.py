"""Shared fixtures. Slow end-to-end tests are marked `slow` and skipped unless
`--runslow` is given; CI runs the short versions of every stage."""
import os

import pytest

SHARED_DATA = os.environ.get(
    "CAI_JAX_SHARED_DATA",
    os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")))


# The tests run on CPU. With the `tpu` extra installed, JAX would otherwise try
# libtpu first on every process (slow, noisy, and it takes /tmp/libtpu_lockfile,
# which the two-process test's children would fight over). The AOT tool reaches
# libtpu's topologies directly and does not need the TPU platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Reuse XLA compilations across test runs on the same machine (cold in a new one).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "cai_jax", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end test, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct, loaded once per test session."""
    from cai_jax.weights.loader import load_model
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from cai_jax.weights import tokenizer
    from cai_jax.weights.packaged import packaged_gguf_path
    return tokenizer.tokenizer_from_gguf(packaged_gguf_path("smollm2"))


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set CAI_JAX_SHARED_DATA)")
    return SHARED_DATA
