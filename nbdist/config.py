"""Pool options, resolved once into a frozen object that is passed down.

This is the only module that reads the environment (GPU visibility, core count);
everything below it receives a `PoolConfig`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nbdist.devices import visible_gpus
from nbdist.errors import ConfigError
from nbdist.launch import LaunchPlan, engine_count


@dataclass(frozen=True)
class PoolConfig:
    n: int
    """Number of engines (ranks) on this machine."""
    gpus: tuple[str, ...]
    """The GPUs of each engine, in rank order ("0", or "0,1" with several GPUs per engine);
    empty for CPU engines."""
    threads_per_engine: int
    """Intra-op threads per engine: the engines' fair share of the cores."""
    start_timeout: float = 60.0
    grace: float = 2.0
    """Seconds the other ranks get to finish after one rank fails before they are freed by force."""
    launch: LaunchPlan = LaunchPlan()
    """Where the engines run (this machine unless told otherwise)."""
    use_gpus: bool = True
    """For engines on other hosts: one GPU each of their host's (False: CPU engines)."""
    preload: tuple[str, ...] = ()
    """Frameworks local engines import while they start (torch, where it is installed)."""

    @property
    def uses_gpus(self) -> bool:
        return bool(self.gpus)


def parse_gpus(spec: str | None) -> str | tuple[str, ...] | None:
    """`all`, `none` or a comma list such as `0,1`."""
    if spec is None:
        return None
    spec = spec.strip()
    if spec in ("all", "none"):
        return spec
    ids = tuple(part.strip() for part in spec.split(","))
    if not ids or not all(part.isdigit() for part in ids):
        raise ConfigError(f"--gpus {spec!r} is not valid: use 'all', 'none' or a list like '0,1'.")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {spec!r} names a GPU twice: give each GPU once, e.g. '0,1'.")
    return ids


def resolve_config(
    n: int | None = None,
    gpus: str | tuple[str, ...] | None = None,
    *,
    start_timeout: float = 60.0,
    grace: float = 2.0,
    gpus_per_engine: int = 1,
    launch: LaunchPlan | None = None,
    preload: str | None = None,
    environ: Mapping[str, str] | None = None,
    cpu_count: Callable[[], int | None] = os.cpu_count,
) -> PoolConfig:
    """Decide engine count, GPU pinning and threads from the user's options and the machine."""
    env = os.environ if environ is None else environ
    if isinstance(gpus, str) and gpus not in ("all", "none"):
        gpus = parse_gpus(gpus)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"-n {n!r} is not valid: the number of engines must be a whole number, at least 1.")
    if start_timeout <= 0:
        raise ConfigError(f"start timeout {start_timeout!r} must be positive.")
    if launch is not None and launch.remote:
        return _remote_config(n, gpus, launch, start_timeout, grace, gpus_per_engine)

    visible = visible_gpus(env)
    if gpus is None:
        # Default: one engine per visible GPU when there are any, CPU engines otherwise.
        chosen: tuple[str, ...] = visible
    elif gpus == "none":
        chosen = ()
    elif gpus == "all":
        if not visible:
            raise ConfigError("--gpus all: no GPU is visible on this machine; leave --gpus out to use CPU engines.")
        chosen = visible
    else:
        assert isinstance(gpus, tuple)
        missing = [g for g in gpus if g not in visible]
        if missing:
            shown = ",".join(visible) or "none"
            raise ConfigError(f"--gpus {','.join(gpus)}: GPU {','.join(missing)} is not visible (visible: {shown}).")
        chosen = gpus

    if gpus_per_engine < 1:
        raise ConfigError(f"--gpus-per-engine {gpus_per_engine!r} must be at least 1.")
    if gpus_per_engine > 1:
        if not chosen or len(chosen) % gpus_per_engine:
            raise ConfigError(
                f"--gpus-per-engine {gpus_per_engine}: the {len(chosen)} GPUs chosen do not split into groups "
                f"of {gpus_per_engine}; choose a multiple of {gpus_per_engine} GPUs with --gpus."
            )
        # One engine per group of GPUs: MirroredStrategy and single-process multi-GPU code.
        chosen = tuple(",".join(chosen[i:i + gpus_per_engine]) for i in range(0, len(chosen), gpus_per_engine))
    if chosen:
        if n is not None and n != len(chosen):
            if n > len(chosen):
                raise ConfigError(
                    f"-n {n} asks for more engines than the {len(chosen)} GPUs chosen; "
                    "use --gpus none for CPU engines."
                )
            chosen = chosen[:n]
        count = len(chosen)
    else:
        count = n if n is not None else 2

    cores = cpu_count() or 1
    return PoolConfig(
        n=count,
        gpus=chosen,
        threads_per_engine=max(1, cores // count),
        start_timeout=start_timeout,
        grace=grace,
        launch=launch or LaunchPlan(),
        preload=_preload(preload),
    )


def _preload(preload: str | None) -> tuple[str, ...]:
    """`torch` by default where it is installed: engines import it while they start, which
    takes it off the first cell; `none` saves the memory (~170 MB an engine) when a pool
    will only run TensorFlow."""
    if preload is None:
        return ("torch",) if importlib.util.find_spec("torch") is not None else ()
    if preload not in ("torch", "none"):
        raise ConfigError(f"--preload {preload!r} is not valid: use 'torch' or 'none'.")
    return () if preload == "none" else ("torch",)


def _remote_config(n: int | None, gpus: str | tuple[str, ...] | None, launch: LaunchPlan,
                   start_timeout: float, grace: float, gpus_per_engine: int) -> PoolConfig:
    """Engines elsewhere: their GPUs and cores are theirs to report once they run."""
    if isinstance(gpus, tuple):
        raise ConfigError(
            f"--gpus {','.join(gpus)} names GPUs of this machine, but the engines run on other hosts, where "
            "each engine gets one of its host's GPUs: leave --gpus out, or use --gpus none for CPU engines."
        )
    if gpus_per_engine != 1:
        raise ConfigError("--gpus-per-engine applies to engines on this machine only.")
    if launch.connect is not None:
        count = n or 0  # 0: every engine the running cluster has
    else:
        count = engine_count(launch, n) or 2
    return PoolConfig(n=count, gpus=(), threads_per_engine=0, start_timeout=start_timeout, grace=grace,
                      launch=launch, use_gpus=gpus != "none")
