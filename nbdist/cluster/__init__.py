"""Cluster management: which engines to start where, starting them through ipyparallel's own
launchers, watching how they end, replacing and stopping them. Runs in the notebook kernel's
process (and `_guard` in front of every process it starts); the only package that touches
ipyparallel's processes and internals."""

from __future__ import annotations

from nbdist.cluster._adopt import EngineInfo
from nbdist.cluster._cluster import EngineCluster
from nbdist.cluster._config import PoolConfig, parse_gpus, resolve_config, resolve_options
from nbdist.cluster._doctor import Check, diagnose
from nbdist.cluster._exits import EngineExit
from nbdist.cluster._launch import LaunchPlan, make_plan
from nbdist.cluster._streams import Outputs, forget_outputs, outputs_of, published

__all__ = ["Check", "EngineCluster", "EngineExit", "EngineInfo", "LaunchPlan", "Outputs", "PoolConfig", "diagnose",
           "forget_outputs", "make_plan", "outputs_of", "parse_gpus", "published", "resolve_config",
           "resolve_options"]
