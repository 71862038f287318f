"""pytest plugin of the GPU check: which CUDA kernels each test launched, recorded with torch.profiler.

Loaded with ``-p gpu_check_trace`` (tools/ on PYTHONPATH) and ``MMER_GPU_CHECK_TRACE=<path>``; writes
``{node id: [kernel names]}`` as JSON when the session ends. tools/gpu_check.py matches those names against the
table of tools/gpu_check_kernels.py, so the claim "this test launches that kernel" is checked on the GPU rather than
trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_TRACE: dict[str, list[str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        yield
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    _TRACE[item.nodeid] = sorted(kernels)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("MMER_GPU_CHECK_TRACE")
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(_TRACE, indent=1))
        tmp.replace(path)
