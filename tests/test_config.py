"""Engine placement and option checking, decided before any process starts."""

from __future__ import annotations

import pytest

from nbdist.backends import check_choice
from nbdist.config import parse_gpus, resolve_config
from nbdist.errors import ConfigError

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
    assert check_choice("torch", None) == "ddp"
    with pytest.raises(ConfigError, match="choose one of"):
        check_choice("torch", "zero")
    with pytest.raises(ConfigError, match="choose one of"):
        check_choice("jax", None)


def test_several_gpus_per_engine_for_single_process_multi_gpu_strategies() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    cfg = resolve_config(None, gpus_per_engine=2, environ=env, cpu_count=lambda: 8)
    assert (cfg.n, cfg.gpus, cfg.threads_per_engine) == (2, ("0,1", "2,3"), 4)
    assert resolve_config(1, "2,3", gpus_per_engine=2, environ=env).gpus == ("2,3",)
    with pytest.raises(ConfigError, match="multiple of 2"):
        resolve_config(None, "0,1,2", gpus_per_engine=2, environ=env)
    with pytest.raises(ConfigError, match="multiple of 2"):
        resolve_config(None, gpus_per_engine=2, environ=NO_GPU)
