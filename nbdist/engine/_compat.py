"""How an engine looks to libraries that ask what kind of process they run in.

A rank is a worker started for it, as torchrun starts one, not an interactive prompt; but
an IPython engine has `sys.ps1`, so libraries take it for one. Lightning then refuses
`Trainer(strategy="ddp")` ("not compatible with an interactive environment") although the
torchrun variables are set, and its notebook strategies (`ddp_notebook`, `ddp_fork`,
`ddp_spawn`) fork or spawn more workers inside every engine, which then wait for a world
that never forms. Here the engine drops `sys.ps1`, and when Lightning is imported its
process-starting DDP variants are told to start nothing (torchrun's "popen" method, which
starts no process when the cluster environment already made them): every Lightning DDP
strategy then trains across the pool's ranks.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["act_as_worker"]

_STRATEGY_REGISTRIES = {
    "lightning.pytorch.strategies": "StrategyRegistry",
    "pytorch_lightning.strategies": "StrategyRegistry",
    "lightning.fabric.strategies": "STRATEGY_REGISTRY",
    "lightning_fabric.strategies": "STRATEGY_REGISTRY",
}


def _ranks_started_by_the_pool(module: ModuleType) -> None:
    registry = getattr(module, _STRATEGY_REGISTRIES[module.__name__], None)
    if not isinstance(registry, dict):
        return
    for entry in registry.values():
        params = entry.get("init_params") if isinstance(entry, dict) else None
        if isinstance(params, dict) and params.get("start_method") in ("fork", "spawn", "forkserver"):
            params["start_method"] = "popen"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls a hook right after one of the named modules has been imported."""

    def __init__(self, hooks: Mapping[str, Callable[[ModuleType], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        hook = self.hooks.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _HookedLoader(spec.loader, hook)
                return spec
        return None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        try:
            self.hook(module)
        except Exception:  # noqa: BLE001 - a newer Lightning with another registry keeps its own behaviour
            pass

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


def act_as_worker() -> None:
    """Make this engine look to libraries like a worker process (see the module's docstring)."""
    if hasattr(sys, "ps1"):
        del sys.ps1
    if hasattr(sys, "ps2"):
        del sys.ps2
    hooks = {name: _ranks_started_by_the_pool for name in _STRATEGY_REGISTRIES}
    for name in list(hooks):
        if name in sys.modules:
            _ranks_started_by_the_pool(sys.modules[name])
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(hooks))
