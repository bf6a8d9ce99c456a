"""Executors: order and results preserved; Local and Ray give bit-identical reference models.

The Ray tests start a private Ray and are marked ``network``; run them inside a
loopback-only network namespace (see ENVIRONMENT.md)::

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' \
        .venv/bin/python -m pytest tests/exec -m network

Without Ray installed, or outside a loopback-only namespace, they skip with the reason,
unless ``CI`` is set (then they fail).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import time
from collections.abc import Iterator

import pytest
import torch

from modelshield.core.errors import InvalidConfigError, UnknownComponentError
from modelshield.exec import EXECUTORS, Executor, LocalExecutor, make_executor

HAVE_RAY = importlib.util.find_spec("ray") is not None


def _non_loopback_interfaces() -> list[str]:
    """Network interfaces besides ``lo``: none inside ``unshare -n`` (loopback only)."""
    return sorted(name for _, name in socket.if_nameindex() if name != "lo")


def _square_sleep(item: tuple[int, float]) -> int:
    """Top-level (picklable) job: sleeps so that jobs finish out of order."""
    value, delay = item
    time.sleep(delay)
    return value * value


def _threads(_: object) -> int:
    return torch.get_num_threads()


def _fail(item: int) -> int:
    if item == 2:
        raise ValueError("job 2 failed")
    return item


def test_registry_and_factory() -> None:
    assert EXECUTORS.names() == ["local", "ray"]
    with make_executor("local") as ex:
        assert isinstance(ex, LocalExecutor)
        assert ex.num_workers == 1
    with pytest.raises(UnknownComponentError, match="known: local, ray"):
        make_executor("dask")
    with pytest.raises(InvalidConfigError, match="executor 'local'"):
        make_executor("local", num_workers=2)


def test_local_preserves_order() -> None:
    items = [(i, 0.0) for i in range(10)]
    ex: Executor = LocalExecutor()
    assert ex.map(_square_sleep, items) == [i * i for i in range(10)]
    assert ex.map(_square_sleep, []) == []


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_ex() -> Iterator[Executor]:
    if not HAVE_RAY:
        msg = "Ray is not installed: pip install 'modelshield[ray]'"
        if os.environ.get("CI"):
            pytest.fail(f"{msg} (CI is set, so this is an error, not a skip)")
        pytest.skip(msg)
    others = _non_loopback_interfaces()
    if others:
        msg = (
            f"Ray binds every interface and this namespace has {others}; run inside a "
            'loopback-only namespace: unshare -n sh -c \'ip link set lo up && exec "$0" '
            '"$@"\' python -m pytest -m network'
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    ex = make_executor("ray", num_workers=2)
    try:
        yield ex
    finally:
        ex.close()


@pytest.mark.network
def test_ray_preserves_order(ray_ex: Executor) -> None:
    assert ray_ex.num_workers == 2
    # early items sleep longest, so they finish last
    items = [(i, 0.05 * (6 - i)) for i in range(6)]
    assert ray_ex.map(_square_sleep, items) == [i * i for i in range(6)]
    assert ray_ex.map(_square_sleep, []) == []
    pw = functools.partial(pow, exp=3)
    assert ray_ex.map(pw, list(range(20))) == [i**3 for i in range(20)]


@pytest.mark.network
def test_ray_tasks_use_one_thread_and_raise_job_errors(ray_ex: Executor) -> None:
    assert ray_ex.map(_threads, [0, 1, 2]) == [1, 1, 1]
    with pytest.raises(ValueError, match="job 2 failed"):
        ray_ex.map(_fail, [0, 1, 2, 3])


@pytest.mark.network
def test_local_and_ray_reference_models_identical(ray_ex: Executor) -> None:
    from modelshield.core.data import load_dataset
    from modelshield.privacy.shadow import ShadowSpec, train_reference_models

    d = load_dataset("digits")
    x, y = d.x[:400], d.y[:400]
    spec = ShadowSpec(arch="mlp", epochs=2, batch_size=64)
    local = train_reference_models(x, y, 10, 4, spec, seed=3, executor=LocalExecutor())
    remote = train_reference_models(x, y, 10, 4, spec, seed=3, executor=ray_ex)
    assert remote.trained == [0, 1, 2, 3]
    for a, b in zip(local.states, remote.states, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    la = local.logits(d.x)
    lb = remote.logits(d.x, executor=ray_ex, min_parallel=0)  # logits computed on Ray too
    assert la.shape == (4, len(d.x), 10)
    assert torch.equal(la, lb)


@pytest.mark.network
def test_dp_canary_audit_runs_on_ray_with_the_same_scores(ray_ex: Executor) -> None:
    from modelshield.core.data import load_dataset
    from modelshield.privacy.dp import DPConfig
    from modelshield.privacy.dp_audit import AuditTraining, audit_canaries

    d = load_dataset("digits").subset(list(range(200)))
    trainer = AuditTraining(
        arch="mlp",
        input_shape=d.input_shape,
        num_classes=d.num_classes,
        dp=DPConfig(noise_multiplier=1.0, epochs=2, batch_size=40, mode="hooks"),
    )
    local = audit_canaries(trainer, d, runs=4, seed=1, executor=LocalExecutor())
    remote = audit_canaries(trainer, d, runs=4, seed=1, executor=ray_ex)
    assert torch.equal(local.scores, remote.scores)
    assert remote.eps_claimed == local.eps_claimed and remote.eps_lower == local.eps_lower
