"""Which GPUs this machine shows, asked of NVML (never of torch: the kernel must stay torch-free)."""

from __future__ import annotations

from collections.abc import Mapping


def _nvml_gpu_count() -> int:
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library: a CPU machine
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def visible_gpus(environ: Mapping[str, str]) -> tuple[str, ...]:
    """GPU ids an engine may be pinned to, honouring the kernel's CUDA_VISIBLE_DEVICES."""
    declared = environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return tuple(d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1")
    return tuple(str(i) for i in range(_nvml_gpu_count()))


# Where launchers (Slurm, Open MPI, MPICH/Intel MPI, PALS, MVAPICH) say which local rank a process is.
SCHEDULER_LOCAL_RANK = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                        "PALS_LOCAL_RANKID", "MV2_COMM_WORLD_LOCAL_RANK")


def scheduler_local_rank(environ: Mapping[str, str]) -> int | None:
    """The local rank a scheduler or mpiexec gave this process, if any (it fixes GPU order)."""
    for name in SCHEDULER_LOCAL_RANK:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None
