"""The PyTorch backend: one `torch.distributed` group for the engines' life, four strategies.

This package and its strategy modules (`ddp`, `fsdp`, `pipeline`, `tensor`) import torch
inside their functions only, so the kernel can read the registry; the `_` modules import
torch at load time and are loaded on engines only.
"""

from __future__ import annotations

from nbdist.backends._base import BackendSpec
from nbdist.backends.torch.ddp import DDP
from nbdist.backends.torch.fsdp import FSDP
from nbdist.backends.torch.pipeline import PipelineParallel
from nbdist.backends.torch.tensor import TensorParallel

SPEC = BackendSpec("torch", "nbdist.backends.torch._backend:TorchBackend",
                   (DDP(), FSDP(), PipelineParallel(), TensorParallel()))
