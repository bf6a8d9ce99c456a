"""Flower strategies: the built-in robust ones, and ours for what Flower lacks.

Flower's ``FedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan``, ``FedMedian`` and
``FedTrimmedAvg`` are used as they are. Added here, as Flower ``Strategy`` subclasses
(``FedAvg`` with a different ``aggregate_train``):

- :class:`NormBound`: clip every update to a norm bound, then average (Sun et al. 2019).
- :class:`FLTrust`: trust-weighted, norm-equalised updates against the server's own update
  on a small clean root set (Cao et al. 2021).
- :class:`CentralDP`: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
  Recurrent Language Models"): every client is sampled independently with probability
  ``q``; each update is clipped to ``C``; the sum gets Gaussian noise ``N(0, σ²C²)`` and is
  divided by the expected count ``qN`` (the fixed-denominator estimator, whose
  sensitivity is ``C / qN``). The accountant (:func:`modelshield.privacy.accounting.compute_epsilon`,
  Poisson-subsampled Gaussian) reports the client-level epsilon after every round, and a
  round that would go past ``max_epsilon`` is refused before it runs.

Each records one entry per round in ``history`` (norms, trust scores, epsilon).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from torch import Tensor

from modelshield.core.errors import InvalidConfigError, PrivacyBudgetExceeded
from modelshield.federated import aggregators as agg
from modelshield.federated.task import FLConfig, flatten, float_keys, unflatten

logger = logging.getLogger(__name__)


def _weight(content: RecordDict, key: str) -> float:
    value = next(iter(content.metric_records.values()))[key]
    return float(value)  # type: ignore[arg-type]


class UpdateStrategy(FedAvg):  # type: ignore[misc]
    """FedAvg whose aggregation is a function of the clients' updates ``w_i − w``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.global_state: dict[str, Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[no-any-return]

    def current_global(self) -> dict[str, Tensor]:
        """The global model this round's updates are relative to."""
        if self.global_state is None:
            raise InvalidConfigError("aggregate_train before configure_train")
        return self.global_state

    def combine(self, updates: Tensor, weights: Tensor, server_round: int) -> Tensor:
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        state = self.current_global()
        keys = float_keys(state)
        base = flatten(state, keys)
        contents = [m.content for m in valid]
        if contents:
            updates = torch.stack(
                [
                    flatten(c.array_records[self.arrayrecord_key].to_torch_state_dict(), keys)
                    - base
                    for c in contents
                ]
            )
            weights = torch.tensor(
                [_weight(c, self.weighted_by_key) for c in contents], dtype=torch.float64
            )
        else:
            updates = torch.zeros(0, len(base), dtype=torch.float64)
            weights = torch.zeros(0, dtype=torch.float64)
        step = self.combine(updates, weights, server_round)
        new = unflatten(base + step, state, keys)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        return ArrayRecord(torch_state_dict=new), metrics


class NormBound(UpdateStrategy):
    """Norm bounding (Sun et al. 2019): clip each update to ``max_norm`` (0: the round's
    median update norm, a bound a minority of attackers cannot inflate), then average."""

    def __init__(self, max_norm: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.max_norm = max_norm

    def combine(self, updates: Tensor, weights: Tensor, server_round: int) -> Tensor:
        if len(updates) == 0:
            return torch.zeros(updates.shape[1], dtype=torch.float64)
        norms = updates.norm(dim=1)
        bound = self.max_norm or float(norms.median())
        self.history.append(
            {"round": server_round, "norm_bound": bound, "clipped": int((norms > bound).sum())}
        )
        return agg.norm_bound(updates, max(bound, 1e-12), weights)


class FLTrust(UpdateStrategy):
    """FLTrust (Cao et al. 2021) with the server's update from ``server_update(state)``."""

    def __init__(
        self, server_update: Callable[[dict[str, Tensor]], dict[str, Tensor]], **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.server_update = server_update

    def combine(self, updates: Tensor, weights: Tensor, server_round: int) -> Tensor:
        state = self.current_global()
        keys = float_keys(state)
        trained = self.server_update(state)
        g0 = flatten(trained, keys) - flatten(state, keys)
        if len(updates) == 0:
            return torch.zeros_like(g0)
        cos = (updates @ g0) / (updates.norm(dim=1).clamp_min(1e-12) * g0.norm().clamp_min(1e-12))
        self.history.append(
            {
                "round": server_round,
                "trusted": int((cos > 0).sum()),
                "mean_trust": float(torch.relu(cos).mean()),
            }
        )
        return agg.fltrust(updates, g0)


class CentralDP(UpdateStrategy):
    """DP-FedAvg with Poisson client sampling and a per-round privacy accountant."""

    def __init__(
        self,
        *,
        num_clients: int,
        sample_rate: float,
        noise_multiplier: float,
        clip: float,
        delta: float,
        max_epsilon: float = 0.0,
        accountant: str = "prv",
        seed: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if not (0 < sample_rate <= 1 and noise_multiplier > 0 and clip > 0 and 0 < delta < 1):
            raise InvalidConfigError("central DP needs 0 < q <= 1, sigma > 0, C > 0, 0 < delta < 1")
        self.num_clients = num_clients
        self.q = sample_rate
        self.sigma = noise_multiplier
        self.clip = clip
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        # secret sampling and noise: the OS CSPRNG unless a seed is asked for (tests)
        self._rng = random.Random(seed) if seed is not None else random.SystemRandom()
        self._gen = torch.Generator().manual_seed(
            seed if seed is not None else random.SystemRandom().getrandbits(62)
        )
        self.rounds_done = 0

    def epsilon(self, rounds: int, accountant: str | None = None) -> float:
        from modelshield.privacy.accounting import compute_epsilon

        return compute_epsilon(
            sample_rate=self.q,
            noise_multiplier=self.sigma,
            steps=rounds,
            delta=self.delta,
            accountant=accountant or self.accountant,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.max_epsilon > 0:
            nxt = self.epsilon(self.rounds_done + 1)
            if nxt > self.max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"round {server_round} would spend epsilon {nxt:.3f} > --max-epsilon {self.max_epsilon:g}"
                )
        self.global_state = arrays.to_torch_state_dict()
        nodes = sorted(grid.get_node_ids())
        chosen = [n for n in nodes if self._rng.random() < self.q]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)  # type: ignore[no-any-return]

    def combine(self, updates: Tensor, weights: Tensor, server_round: int) -> Tensor:
        state = self.current_global()
        d = len(flatten(state, float_keys(state)))
        total = (
            agg.clip_to_norm(updates, self.clip).sum(0)
            if len(updates)
            else torch.zeros(d, dtype=torch.float64)
        )
        noise = torch.randn(d, generator=self._gen, dtype=torch.float64) * self.sigma * self.clip
        self.rounds_done += 1
        eps = self.epsilon(self.rounds_done)
        self.history.append(
            {
                "round": server_round,
                "sampled": len(updates),
                "clipped": int((updates.norm(dim=1) > self.clip).sum()) if len(updates) else 0,
                "epsilon": eps,
                "epsilon_rdp": self.epsilon(self.rounds_done, "rdp"),
            }
        )
        logger.info("round %d: epsilon %.4f (delta %g)", server_round, eps, self.delta)
        return (total + noise) / (self.q * self.num_clients)


def make_strategy(
    cfg: FLConfig,
    server_update: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> Strategy:
    """The strategy ``cfg.aggregator`` names (with central DP when ``cfg.dp == "central"``)."""
    n = cfg.num_clients
    per_round = max(1, math.floor(cfg.fraction * n))
    f = cfg.num_malicious_assumed if cfg.num_malicious_assumed >= 0 else max(1, cfg.n_malicious)
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": per_round,
        "min_evaluate_nodes": 0,
        "min_available_nodes": n,
    }
    name = cfg.aggregator
    if cfg.dp == "central":
        return CentralDP(
            num_clients=n,
            sample_rate=cfg.fraction,
            noise_multiplier=cfg.noise_multiplier,
            clip=cfg.clip,
            delta=cfg.delta,
            max_epsilon=cfg.max_epsilon,
            **common,
        )
    if name == "fedavg":
        return FedAvg(**common)
    if name == "krum":
        return Krum(num_malicious_nodes=f, **common)
    if name == "multi-krum":
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, per_round - f), **common)
    if name == "bulyan":
        if per_round < 4 * f + 3:
            raise InvalidConfigError(
                f"Bulyan needs at least 4f + 3 = {4 * f + 3} clients per round, got {per_round}"
            )
        return Bulyan(num_malicious_nodes=f, **common)
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_beta, **common)
    if name == "norm-bound":
        return NormBound(max_norm=cfg.norm_bound, **common)
    if name == "fltrust":
        if server_update is None:
            raise InvalidConfigError("FLTrust needs the server's root-data update")
        return FLTrust(server_update=server_update, **common)
    raise InvalidConfigError(f"unknown aggregator {name!r}")
