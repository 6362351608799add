"""Pool options, resolved once into a frozen object that is passed down.

`resolve_options` is the one entry point (used by `Pool`, and so by the magics, the control
panel and `scaling_report`), and the kernel's one place that reads its environment (GPU
visibility, core count). Engines read their own environment, on their own host.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nbdist._devices import visible_gpus
from nbdist._errors import ConfigError
from nbdist.cluster._launch import LaunchPlan, engine_count, make_plan

Gpus = str | tuple[str, ...] | None
"""`all`, `none`, a tuple of GPU ids, or None for the default (every visible GPU)."""


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


def parse_gpus(spec: str | None) -> Gpus:
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


def resolve_options(
    n: int | None = None,
    gpus: Gpus = None,
    *,
    gpus_per_engine: int = 1,
    start_timeout: float = 60.0,
    grace: float = 2.0,
    preload: str | None = None,
    **launch: str | None,
) -> PoolConfig:
    """Every option a user can give a pool, checked together: the words of `%nbdist start`.
    `launch` are `make_plan`'s (launcher, hosts, hosts_file, python, ssh_args, interface,
    partition, account, time, mpi_args, connect)."""
    plan = make_plan(launch.pop("launcher", None), **launch)
    return resolve_config(n, gpus, start_timeout=start_timeout, grace=grace, gpus_per_engine=gpus_per_engine,
                          launch=plan, preload=preload)


def resolve_config(
    n: int | None = None,
    gpus: Gpus = None,
    *,
    start_timeout: float = 60.0,
    grace: float = 2.0,
    gpus_per_engine: int = 1,
    launch: LaunchPlan | None = None,
    preload: str | None = None,
    environ: Mapping[str, str] | None = None,
    cpu_count: Callable[[], int | None] = os.cpu_count,
    available_mb: Callable[[], float] | None = None,
) -> PoolConfig:
    """Decide engine count, GPU pinning and threads from the options and the machine."""
    if isinstance(gpus, str) and gpus not in ("all", "none"):
        gpus = parse_gpus(gpus)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"-n {n!r} is not valid: the number of engines must be a whole number, at least 1.")
    if start_timeout <= 0:
        raise ConfigError(f"start timeout {start_timeout!r} must be positive.")
    if launch is not None and launch.remote:
        return _remote_config(n, gpus, launch, start_timeout, grace, gpus_per_engine)
    chosen = _group_gpus(_choose_gpus(gpus, visible_gpus(os.environ if environ is None else environ)),
                         gpus_per_engine)
    chosen, count = _engine_count(n, chosen)
    preloaded = _preload(preload)
    _check_fits(count, preloaded, available_mb() if available_mb is not None else _available_mb(), cpu_count() or 1)
    return PoolConfig(
        n=count,
        gpus=chosen,
        threads_per_engine=max(1, (cpu_count() or 1) // count),
        start_timeout=start_timeout,
        grace=grace,
        launch=launch or LaunchPlan(),
        preload=preloaded,
    )


def _choose_gpus(gpus: Gpus, visible: tuple[str, ...]) -> tuple[str, ...]:
    if gpus is None:
        return visible  # one engine per visible GPU when there are any, CPU engines otherwise
    if gpus == "none":
        return ()
    if gpus == "all":
        if not visible:
            raise ConfigError("--gpus all: no GPU is visible on this machine; leave --gpus out to use CPU engines.")
        return visible
    assert isinstance(gpus, tuple)
    missing = [g for g in gpus if g not in visible]
    if missing:
        shown = ",".join(visible) or "none"
        raise ConfigError(f"--gpus {','.join(gpus)}: GPU {','.join(missing)} is not visible (visible: {shown}).")
    return gpus


def _group_gpus(chosen: tuple[str, ...], per_engine: int) -> tuple[str, ...]:
    """One engine per group of GPUs: MirroredStrategy and single-process multi-GPU code."""
    if per_engine < 1:
        raise ConfigError(f"--gpus-per-engine {per_engine!r} must be at least 1.")
    if per_engine == 1:
        return chosen
    if not chosen or len(chosen) % per_engine:
        raise ConfigError(
            f"--gpus-per-engine {per_engine}: the {len(chosen)} GPUs chosen do not split into groups "
            f"of {per_engine}; choose a multiple of {per_engine} GPUs with --gpus."
        )
    return tuple(",".join(chosen[i:i + per_engine]) for i in range(0, len(chosen), per_engine))


def _engine_count(n: int | None, chosen: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
    if not chosen:
        return (), n if n is not None else 2
    if n is not None and n > len(chosen):
        raise ConfigError(
            f"-n {n} asks for more engines than the {len(chosen)} GPUs chosen; use --gpus none for CPU engines."
        )
    chosen = chosen[:n] if n is not None else chosen
    return chosen, len(chosen)


# Measured resident memory of an idle engine: with torch imported while it starts, and without.
ENGINE_MB = {"torch": 330.0, "none": 110.0}
MAX_ENGINES_PER_CORE = 8


def _available_mb() -> float:
    import psutil

    return float(psutil.virtual_memory().available) / 2**20


def _check_fits(count: int, preload: tuple[str, ...], available: float, cores: int) -> None:
    """Refuse, before anything starts, a pool this machine cannot hold or run."""
    per = ENGINE_MB["torch" if preload else "none"]
    if count * per > available:
        fit = max(1, int(available // per))
        lighter = (f", or --preload none (~{ENGINE_MB['none']:.0f} MB each) for TensorFlow-only pools"
                   if preload else "")
        raise ConfigError(
            f"-n {count}: {count} engines need about {count * per / 1024:.1f} GB ({per:.0f} MB each"
            f"{' with torch preloaded' if preload else ''}), but this machine has {available / 1024:.1f} GB "
            f"available: start at most {fit}{lighter}."
        )
    if count > MAX_ENGINES_PER_CORE * cores:
        raise ConfigError(
            f"-n {count} is {count / cores:.0f} engines per core on this {cores}-core machine: the ranks would take "
            f"turns on the cores instead of running together. Start at most {MAX_ENGINES_PER_CORE * cores}, or "
            "use other hosts (--hosts, --launcher slurm)."
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


def _remote_config(n: int | None, gpus: Gpus, launch: LaunchPlan,
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
