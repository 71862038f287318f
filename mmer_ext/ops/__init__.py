"""Typed wrappers of the ``torch.ops.mmer_ext`` operators, usable from any project.

Each op family has its own module (schema and kernels under ``csrc/ops/<family>/``); pure-PyTorch references of every
op are in :mod:`mmer_ext.ops._reference`; ``nn.Module`` forms (:class:`CMDLoss`, :class:`AngularAdjacency`,
:class:`BlockGraphPropagate`) in :mod:`mmer_ext.ops.modules`.
"""

from mmer_ext.ops.attention import attention
from mmer_ext.ops.angular_adjacency import angular_adjacency, block_graph_propagate
from mmer_ext.ops.cmd import central_moments, cmd, cmd_pairwise
from mmer_ext.ops.gcnii import gcnii_layer
from mmer_ext.ops.modules import AngularAdjacency, BlockGraphPropagate, CMDLoss
from mmer_ext.ops.diffusion_steps import (
    ddim_step,
    langevin_corrector_step,
    ve_diffusion_coeff,
    ve_marginal_std,
    ve_ode_step,
    ve_perturb,
    ve_sde_em_step,
)

__all__ = [
    "AngularAdjacency",
    "BlockGraphPropagate",
    "CMDLoss",
    "angular_adjacency",
    "attention",
    "block_graph_propagate",
    "central_moments",
    "cmd",
    "cmd_pairwise",
    "ddim_step",
    "gcnii_layer",
    "langevin_corrector_step",
    "ve_diffusion_coeff",
    "ve_marginal_std",
    "ve_ode_step",
    "ve_perturb",
    "ve_sde_em_step",
]
