"""mmer_ext: C++/CUDA-accelerated PyTorch ops and models for multimodal emotion recognition with missing or noisy
modalities.

Importing the package loads the compiled library, which registers the ops as ``torch.ops.mmer_ext.*``; the typed
Python wrappers live in :mod:`mmer_ext.ops`.
"""

from mmer_ext.runtime import prefer_passive_wait as _prefer_passive_wait

_prefer_passive_wait()  # before torch loads its OpenMP runtime, which reads OMP_WAIT_POLICY once (mmer_ext.runtime)

import torch  # noqa: E402, F401  (torch's libraries must be loaded before ours)

from mmer_ext._build import load_library as _load_library
from mmer_ext._build import started_as_cli as _started_as_cli
from mmer_ext._build import version_without_library as _version_without_library

try:
    _C = _load_library()
except ImportError as _error:
    if not _started_as_cli():
        raise
    # The command line must still answer --help and `info` (which explains this error); every other command
    # reports it and stops (mmer_ext.cli). Library users always get the ImportError.
    _C = None
    load_error: "ImportError | None" = _error
    __version__ = _version_without_library()
    __all__ = ["__version__"]
else:
    load_error = None
    from mmer_ext import ops  # noqa: E402  (registers fake kernels and autograd formulas on the loaded ops)
    from mmer_ext.info import build_info  # noqa: E402

    __version__ = _C.__version__
    __all__ = ["ops", "build_info", "__version__"]
