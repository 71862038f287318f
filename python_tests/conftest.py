"""Shared fixtures of the mmer_ext test suite.

Run the suite with the venv's ``pytest`` executable from the repository root, not ``python -m pytest``: the latter
puts the source tree first on sys.path, and its ``mmer_ext/`` has no compiled library. For the same reason no
test folder has an ``__init__.py`` (pytest would then insert the repository root into sys.path).

Markers (declared in pyproject.toml):
  cuda  the test needs a CUDA GPU; it is skipped when ``torch.cuda.is_available()`` is false.
  slow  minutes on a 2-core CPU; skipped unless ``--run-slow`` is given or ``-m`` selects ``slow``.
"""

from __future__ import annotations

import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = "needs a CUDA GPU"

# Parametrize over these for a test that must hold on every device: "cpu" always runs, "cuda" only with a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)]),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def _slow_selected(config: pytest.Config) -> bool:
    if config.getoption("--run-slow"):
        return True
    markexpr = config.getoption("-m") or ""
    return "slow" in markexpr and "not slow" not in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = _slow_selected(config)
    skip_slow = pytest.mark.skip(reason="slow on a 2-core CPU; run with --run-slow or -m slow")
    skip_cuda = pytest.mark.skip(reason=NEEDS_CUDA)
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        # A test marked cuda by hand (not through DEVICES) still needs the skip.
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Fixed seeds make every failure reproducible from its test id alone; the thread count is restored because
    # determinism tests change it and a leaked setting would slow (or hide problems in) later tests.
    random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """A clean dynamo state with the FX-graph and AOTAutograd caches off, for the ``torch.compile`` tests of the ops.

    Those caches key a compiled graph on the traced program, not on our library: after a rebuild that changes an op
    (say the shape of a private op's saved statistics) they would replay a graph built from the old fake kernel, and
    a cache hit would also skip the fake kernels these tests exist to check. (Inductor's kernel code cache is keyed
    by the generated source and stays on.)
    """
    import torch._functorch.config
    import torch._inductor.config

    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
    torch._dynamo.reset()
