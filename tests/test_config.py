"""Engine placement and option checking, decided before any process starts."""

from __future__ import annotations

import pytest

from nbdist import ConfigError
from nbdist._wire import Formation, RankInfo
from nbdist.backends import BACKENDS, backend_spec
from nbdist.cluster import parse_gpus, resolve_config

NO_GPU: dict[str, str] = {"CUDA_VISIBLE_DEVICES": ""}


def test_cpu_engines_share_the_cores() -> None:
    cfg = resolve_config(2, environ=NO_GPU, cpu_count=lambda: 8)
    assert (cfg.n, cfg.gpus, cfg.threads_per_engine) == (2, (), 4)
    assert resolve_config(3, environ=NO_GPU, cpu_count=lambda: 2).threads_per_engine == 1


def test_one_engine_per_visible_gpu_by_default() -> None:
    cfg = resolve_config(None, environ={"CUDA_VISIBLE_DEVICES": "2,5"}, cpu_count=lambda: 16)
    assert cfg.gpus == ("2", "5") and cfg.n == 2 and cfg.threads_per_engine == 8


def test_gpu_list_and_n() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert resolve_config(None, "1,3", environ=env).gpus == ("1", "3")
    assert resolve_config(2, environ=env).gpus == ("0", "1")
    assert resolve_config(3, "none", environ=env).gpus == ()


@pytest.mark.parametrize(
    ("n", "gpus", "env", "fragment"),
    [
        (0, None, NO_GPU, "at least 1"),
        (None, "all", NO_GPU, "no GPU is visible"),
        (None, "7", {"CUDA_VISIBLE_DEVICES": "0,1"}, "GPU 7 is not visible"),
        (4, "0,1", {"CUDA_VISIBLE_DEVICES": "0,1"}, "--gpus none"),
    ],
)
def test_bad_placement_names_the_fix(n: int | None, gpus: str | None, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(n, gpus, environ=env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["0,a", "1,1", "", "x"])
def test_gpu_spec_rejected(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_gpus(spec)


def test_backend_and_strategy_choices() -> None:
    assert backend_spec("torch").strategy(None).name == "ddp"
    assert [s.name for s in BACKENDS["tensorflow"].strategies] == ["multiworker", "ps", "mirrored"]
    with pytest.raises(ConfigError, match="choose one of ddp, fsdp, pipeline, tensor"):
        backend_spec("torch").strategy("zero")
    with pytest.raises(ConfigError, match="choose one of"):
        backend_spec("jax")


def test_a_strategy_says_how_it_is_formed_and_checks_its_options() -> None:
    torch, tf = BACKENDS["torch"], BACKENDS["tensorflow"]
    # One torch group serves every strategy; TensorFlow is joined per strategy and its options.
    assert torch.formation(torch.strategy("fsdp"), {"ps": 3}) == Formation("torch")
    ps = tf.strategy("ps")
    assert tf.formation(ps, {"ps": 2}) == Formation("tensorflow", "ps", (("ps", 2),))
    assert tf.formation(tf.strategy("multiworker"), {"ps": 2}) == Formation("tensorflow", "multiworker")
    with pytest.raises(ConfigError, match="--ps 2 does not fit 2 engines: .* choose 1 to 1"):
        ps.check(2, {"ps": 2})
    ps.check(3, {"ps": 2})
    # With no engine left for a worker, the coordinator's engine hosts one on an extra port.
    assert ps.extra_servers(2, {"ps": 1}) == 1 and ps.extra_servers(3, {"ps": 1}) == 0
    assert [ps.runs_cell(r, 3, {"ps": 1}) for r in range(3)] == [True, False, False]
    assert {s.name: s.threads for s in torch.strategies} == {
        "ddp": "compute", "fsdp": "compute", "pipeline": "all", "tensor": "all"}


def test_parameter_server_roles_from_the_ranks() -> None:
    ps = BACKENDS["tensorflow"].strategy("ps")
    peers = ("a:1", "b:2", "c:3", "d:4")
    infos = [RankInfo(r, r, 4, 4, 0, "a", 1, None, 1, peers=peers) for r in range(4)]
    roles = [ps.roles(i, {"ps": 2}) for i in infos]  # type: ignore[attr-defined]
    assert roles[0] == ({"chief": ["a:1"], "worker": ["b:2"], "ps": ["c:3", "d:4"]}, "chief", 0)
    assert [r[1:] for r in roles] == [("chief", 0), ("worker", 0), ("ps", 0), ("ps", 1)]
    # Two engines and one server: the chief's engine hosts the one worker on the extra peer.
    two = [RankInfo(r, r, 2, 2, 0, "a", 1, None, 1, peers=("a:1", "b:2", "a:3")) for r in range(2)]
    assert ps.roles(two[0], {"ps": 1})[0]["worker"] == ["a:3"]  # type: ignore[attr-defined]


def test_several_gpus_per_engine_for_single_process_multi_gpu_strategies() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    cfg = resolve_config(None, gpus_per_engine=2, environ=env, cpu_count=lambda: 8)
    assert (cfg.n, cfg.gpus, cfg.threads_per_engine) == (2, ("0,1", "2,3"), 4)
    assert resolve_config(1, "2,3", gpus_per_engine=2, environ=env).gpus == ("2,3",)
    with pytest.raises(ConfigError, match="multiple of 2"):
        resolve_config(None, "0,1,2", gpus_per_engine=2, environ=env)
    with pytest.raises(ConfigError, match="multiple of 2"):
        resolve_config(None, gpus_per_engine=2, environ=NO_GPU)


def test_one_device_rule_for_engines_and_torchrun_workers() -> None:
    """nbdist.torch.device(), the cell's `device` and the backend's group all come from one rule:
    an engine sees only the GPUs it owns (CUDA_VISIBLE_DEVICES set before torch touches CUDA), so
    its device is cuda:0 whatever its local rank; a torchrun worker sees the host's GPUs."""
    from nbdist.backends.torch._device import NOT_AN_ENGINE, device_index

    assert device_index("0,1", visible=2, local_rank=1) == 0  # --gpus-per-engine 2, second engine
    assert device_index("3", visible=1, local_rank=1) == 0
    assert device_index(None, visible=2, local_rank=1) is None  # a CPU engine on a GPU machine
    assert device_index("0", visible=0, local_rank=0) is None  # no CUDA in this torch
    assert device_index(NOT_AN_ENGINE, visible=4, local_rank=1) == 1
    assert device_index(NOT_AN_ENGINE, visible=0, local_rank=1) is None


def test_an_engine_owning_two_gpus_sees_exactly_them() -> None:
    """What the rule assumes, at its boundary: pinning sets the engine's own CUDA_VISIBLE_DEVICES
    (and its thread variables) before any framework import; a CPU engine hides every GPU."""
    import subprocess
    import sys

    code = (
        "import os\nfrom nbdist.engine._context import pin\n"
        "pin('2,3', 4, 1, 2); print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])\n"
        "pin(None, 1); print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["2,3 4", "''"]


def test_a_pool_the_machine_cannot_hold_is_refused_before_anything_starts() -> None:
    plenty = {"environ": NO_GPU, "cpu_count": lambda: 2}
    with pytest.raises(ConfigError, match=r"-n 10000: 10000 engines need about 3222.7 GB \(330 MB each with "
                       r"torch preloaded\), but this machine has 23.4 GB available: start at most 72, or "
                       r"--preload none \(~110 MB each\)"):
        resolve_config(10000, preload="torch", available_mb=lambda: 24000.0, **plenty)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="-n 17 is 8 engines per core on this 2-core machine.*at most 16"):
        resolve_config(17, preload="none", available_mb=lambda: 10**6, **plenty)  # type: ignore[arg-type]
    assert resolve_config(16, preload="none", available_mb=lambda: 10**6, **plenty).n == 16  # type: ignore[arg-type]


def test_doctor_checks_a_local_start_without_importing_torch_here() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom nbdist.cluster import diagnose\nrows = {c.check: c for c in diagnose(2, gpus='none')}\n"
            "print(rows['options'].result, rows['free ports'].result, rows['CUDA / NCCL'].detail, "
            "'torch' in sys.modules)\nbad = diagnose(2, launcher='slurm', hosts='a:1')\n"
            "print(bad[0].result, bad[0].detail)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ok ok torch is a CPU build (gloo only) False" in out or "CUDA" in out and "False" in out.splitlines()[0]
    assert "problem --hosts does not apply to --launcher slurm" in out
