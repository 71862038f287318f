"""Typed wrappers of the ``torch.ops.mmer_ext`` operators, usable from any project.

Each op family has its own module (schema and kernels under ``csrc/ops/<family>/``); pure-PyTorch references
of every op are in :mod:`mmer_ext.ops._reference`.
"""

from mmer_ext.ops.cmd import central_moments, cmd, cmd_pairwise

__all__ = ["central_moments", "cmd", "cmd_pairwise"]
