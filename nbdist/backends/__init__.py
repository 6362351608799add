"""Backends and their strategies, named here; a backend's framework is imported on engines only.

The kernel checks `--backend` / `--strategy` and the strategy's options against this registry
without importing a framework; an engine turns a name into a `Backend` with `load_backend`.
A new strategy is one file in its backend's folder, listed in that backend's `SPEC`.
"""

from __future__ import annotations

import importlib

from nbdist._errors import ConfigError
from nbdist.backends import tensorflow, torch
from nbdist.backends._base import Backend, BackendSpec, Strategy

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (torch.SPEC, tensorflow.SPEC)}


def backend_spec(name: str) -> BackendSpec:
    spec = BACKENDS.get(name)
    if spec is None:
        raise ConfigError(f"--backend {name!r} is not known: choose one of {', '.join(BACKENDS)}.")
    return spec


def load_backend(name: str) -> Backend:
    """The backend's engine-side object (this imports its framework: engines only)."""
    module_name, _, attr = BACKENDS[name].target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    backend: Backend = cls()
    return backend


__all__ = ["BACKENDS", "Backend", "BackendSpec", "Strategy", "backend_spec", "load_backend"]
