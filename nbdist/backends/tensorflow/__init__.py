"""The TensorFlow backend: a `TF_CONFIG` cluster formed once per engine life, for one strategy.

This package and its strategy modules (`multiworker`, `ps`, `mirrored`) receive the
`tensorflow` module as an argument and never import it themselves, so the kernel can read
the registry; `_backend` imports TensorFlow on engines.
"""

from __future__ import annotations

from nbdist.backends._base import BackendSpec
from nbdist.backends.tensorflow.mirrored import Mirrored
from nbdist.backends.tensorflow.multiworker import MultiWorker
from nbdist.backends.tensorflow.ps import ParameterServer

SPEC = BackendSpec("tensorflow", "nbdist.backends.tensorflow._backend:TensorFlowBackend",
                   (MultiWorker(), ParameterServer(), Mirrored()), formed_per_strategy=True, needs_peers=True)
