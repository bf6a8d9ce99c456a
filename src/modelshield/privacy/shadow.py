"""Shadow / reference models for membership inference, trained on random halves of a pool.

The LiRA "online" scheme (Carlini et al., *Membership Inference Attacks From First
Principles*, S&P 2022): ``k`` reference models, each point of the pool is in the training
set of exactly ``k/2`` of them, so every point has ``k/2`` IN and ``k/2`` OUT models. The
same models serve the shadow-model attack (Shokri et al., S&P 2017) and RMIA
(Zarifzadeh et al., ICML 2024).

Every model is trained on CPU with one thread and its own seed derived from
``(seed, i)``, so the weights are bit-identical whichever executor ran the job. Trained
weights are cached as ``cache_dir/<key>.pt`` (written atomically, read with
``weights_only=True``); the key hashes the data, the model's mask row, the spec, the seed
and ``i``, so a rerun retrains only what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modelshield.core.architectures import ARCHITECTURES, build
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.io import atomic_open
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.train import train_classifier
from modelshield.exec.local import Executor, LocalExecutor

logger = logging.getLogger(__name__)

#: Bumped when the training recipe changes in a way that makes old cache files stale.
CACHE_FORMAT = 1

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class ShadowSpec:
    """How each reference model is built and trained.

    ``arch`` names an entry of the architectures registry (``mlp``, ``small_cnn``, ...).
    """

    arch: str = "mlp"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHITECTURES:
            ARCHITECTURES.get(str(self.arch))  # raises with the list of known names
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidConfigError(f"ShadowSpec.{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise InvalidConfigError(f"ShadowSpec.lr must be a number > 0, got {self.lr!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0:
            raise InvalidConfigError(f"ShadowSpec.weight_decay must be a number >= 0, got {wd!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (also part of the cache key)."""
        return asdict(self)


def _check_positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def reference_masks(n_points: int, k: int, seed: int) -> Tensor:
    """Membership masks ``(k, n_points)`` bool: ``mask[i, j]`` = point ``j`` trains model ``i``.

    For each point an independent random permutation of the ``k`` models picks the
    ``k // 2`` that train on it (LiRA online scheme), so with even ``k`` every point is in
    exactly half of the models. With odd ``k`` a point is in ``k // 2`` or ``k // 2 + 1``
    models, each with probability 1/2. Deterministic in ``seed``.
    """
    n_points = _check_positive_int("n_points", n_points)
    k = _check_positive_int("k", k)
    if k < 2:
        raise InvalidConfigError(f"k must be >= 2 (IN and OUT models per point), got {k}")
    g = make_generator(check_seed(seed))
    ranks = torch.rand(n_points, k, generator=g).argsort(dim=1).argsort(dim=1)
    take = torch.full((n_points, 1), k // 2, dtype=torch.long)
    if k % 2:
        take = take + torch.randint(0, 2, (n_points, 1), generator=g)
    return (ranks < take).T.contiguous()


def derive_seed(seed: int, i: int) -> int:
    """Seed of reference model ``i``: a hash of ``(seed, i)`` in ``[0, 2**63)``."""
    digest = hashlib.sha256(f"modelshield.shadow:{seed}:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def data_digest(x: Tensor, y: Tensor) -> str:
    """sha256 of the raw bytes, shapes and dtypes of ``x`` and ``y``."""
    h = hashlib.sha256()
    for t in (x, y):
        c = t.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)}|{c.dtype}|".encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()


def cache_key(
    data_sha256: str,
    mask_row: Tensor,
    spec: ShadowSpec,
    seed: int,
    i: int,
    num_classes: int,
) -> str:
    """The cache file stem of reference model ``i`` (a sha256 hex digest)."""
    mask_sha = hashlib.sha256(mask_row.to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()
    payload = {
        "format": CACHE_FORMAT,
        "data": data_sha256,
        "mask": mask_sha,
        "n": int(mask_row.numel()),
        "spec": spec.to_dict(),
        "seed": seed,
        "i": i,
        "num_classes": num_classes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread, restored afterwards: thread count can change float reductions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(spec: ShadowSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    return build(spec.arch, input_shape, num_classes)


def _train_one(
    job: tuple[int, Tensor, int],
    *,
    x: Tensor,
    y: Tensor,
    spec: ShadowSpec,
    num_classes: int,
) -> StateDict:
    """Train one reference model on ``x[mask]`` (runs in the executor's worker)."""
    _i, mask, model_seed = job
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed)
        module = _build(spec, tuple(x.shape[1:]), num_classes)
        train_classifier(
            module,
            x[mask],
            y[mask],
            epochs=spec.epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            weight_decay=spec.weight_decay,
            seed=model_seed,
            device="cpu",
        )
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _logits_one(
    state: StateDict,
    *,
    x: Tensor,
    spec: ShadowSpec,
    num_classes: int,
    batch_size: int,
) -> Tensor:
    """Logits ``(N, C)`` of one reference model (runs in the executor's worker)."""
    with _one_thread(), torch.no_grad():
        module = _build(spec, tuple(x.shape[1:]), num_classes)
        module.load_state_dict(state)
        module.eval()
        out = [module(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(out).detach()


@dataclass(eq=False)
class ReferenceModels:
    """``k`` trained reference models and the membership mask they were trained with.

    ``masks[i, j]`` is True when pool point ``j`` was in model ``i``'s training set.
    ``trained`` / ``cached`` list the model indices trained in this call and loaded from
    the cache.
    """

    spec: ShadowSpec
    input_shape: tuple[int, ...]
    num_classes: int
    masks: Tensor
    states: list[StateDict]
    seed: int
    keys: list[str]
    trained: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0

    def __len__(self) -> int:
        return len(self.states)

    @property
    def k(self) -> int:
        return len(self.states)

    def model(self, i: int) -> nn.Module:
        """Reference model ``i`` as an ``nn.Module`` in eval mode."""
        if not 0 <= i < len(self.states):
            raise InvalidConfigError(f"model index must be in [0, {len(self.states)}), got {i}")
        module = _build(self.spec, self.input_shape, self.num_classes)
        module.load_state_dict(self.states[i])
        return module.eval()

    def logits(
        self,
        x: Tensor,
        *,
        executor: Executor | None = None,
        batch_size: int = 1024,
        min_parallel: int = 200_000,
    ) -> Tensor:
        """Every model's logits on ``x``: a float tensor ``(k, N, C)`` on CPU.

        Each model runs with one thread (so results do not depend on where they ran).
        With ``executor`` and ``k * N >= min_parallel`` the models are spread over it.
        """
        x = _check_x(x, self.input_shape)
        batch_size = _check_positive_int("batch_size", batch_size)
        fn = functools.partial(
            _logits_one, x=x, spec=self.spec, num_classes=self.num_classes, batch_size=batch_size
        )
        if executor is not None and self.k * len(x) >= min_parallel:
            outs = executor.map(fn, self.states)
        else:
            outs = [fn(s) for s in self.states]
        return torch.stack(outs)


def _check_x(x: Tensor, input_shape: Sequence[int] | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise DataError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or len(x) == 0:
        raise DataError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"x must be a floating-point tensor, got {x.dtype}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"x has input shape {tuple(x.shape[1:])}, the models take {tuple(input_shape)}"
        )
    if not torch.isfinite(x).all():
        raise DataError("x contains NaN or inf")
    return x.detach().cpu().contiguous()


def _load_cached(path: Path) -> StateDict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated or foreign file: retrain and overwrite it
        logger.warning("ignoring unreadable cache file %s (%s); retraining", path, e)
        return None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        logger.warning("ignoring cache file %s: not a state_dict; retraining", path)
        return None
    return dict(state)


def train_reference_models(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    k: int,
    spec: ShadowSpec,
    *,
    seed: int,
    cache_dir: str | os.PathLike[str] | None = None,
    executor: Executor | None = None,
    masks: Tensor | None = None,
) -> ReferenceModels:
    """Train ``k`` reference models, model ``i`` on the pool points where ``masks[i]``.

    ``masks`` defaults to :func:`reference_masks` ``(len(x), k, seed)``. Model ``i`` is
    seeded with :func:`derive_seed` ``(seed, i)``. With ``cache_dir`` every trained
    state_dict is stored as ``cache_dir/<key>.pt`` and reused by later calls with the same
    data, mask row, spec, seed and index. Jobs run on ``executor`` (default: local).
    """
    t0 = time.perf_counter()
    x = _check_x(x)
    if not isinstance(y, Tensor) or y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"y must be a 1-D tensor with one label per row of x ({len(x)}), got "
            f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
        )
    y = y.detach().cpu().to(torch.long).contiguous()
    num_classes = _check_positive_int("num_classes", num_classes)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    k = _check_positive_int("k", k)
    seed = check_seed(seed)
    if not isinstance(spec, ShadowSpec):
        raise InvalidConfigError(f"spec must be a ShadowSpec, got {type(spec).__name__}")
    if masks is None:
        masks = reference_masks(len(x), k, seed)
    elif not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.shape != (k, len(x)):
        raise InvalidConfigError(
            f"masks must be a bool tensor of shape ({k}, {len(x)}), got "
            f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}"
        )
    masks = masks.cpu().contiguous()
    empty = [i for i in range(k) if not bool(masks[i].any())]
    if empty:
        raise InvalidConfigError(f"reference model(s) {empty} would train on no points")

    digest = data_digest(x, y)
    keys = [cache_key(digest, masks[i], spec, seed, i, num_classes) for i in range(k)]
    cache = None if cache_dir is None else Path(cache_dir)
    states: list[StateDict | None] = [None] * k
    cached: list[int] = []
    if cache is not None:
        for i, key in enumerate(keys):
            states[i] = _load_cached(cache / f"{key}.pt")
            if states[i] is not None:
                cached.append(i)
    todo = [i for i in range(k) if states[i] is None]
    if todo:
        ex = executor if executor is not None else LocalExecutor()
        fn = functools.partial(_train_one, x=x, y=y, spec=spec, num_classes=num_classes)
        logger.info("training %d of %d reference model(s) (%s) on %r", len(todo), k, spec.arch, ex)
        jobs = [(i, masks[i], derive_seed(seed, i)) for i in todo]
        results = ex.map(fn, jobs)
        for i, state in zip(todo, results, strict=True):
            states[i] = state
            if cache is not None:
                with atomic_open(cache / f"{keys[i]}.pt", "wb") as fh:
                    torch.save(state, fh)
    if cached:
        logger.info("loaded %d reference model(s) from %s", len(cached), cache)
    final = [s for s in states if s is not None]
    return ReferenceModels(
        spec=spec,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        masks=masks,
        states=final,
        seed=seed,
        keys=keys,
        trained=todo,
        cached=cached,
        wall_time_s=time.perf_counter() - t0,
    )


__all__ = [
    "ReferenceModels",
    "ShadowSpec",
    "cache_key",
    "data_digest",
    "derive_seed",
    "reference_masks",
    "train_reference_models",
]
