"""A federated task: the run's configuration, each client's data, local training, and the
server's evaluation. Shared by the simulation and the deployment apps, which both read
the configuration from Flower's run config (flat ``key = value`` pairs)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield.core.architectures import build
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.core.seeding import make_generator
from modelshield.federated.attacks import ATTACKS
from modelshield.federated.partition import dirichlet_partition, iid_partition

logger = logging.getLogger(__name__)

FL_AGGREGATORS: Registry[str] = Registry("fl-aggregators")
_AGGREGATORS_HELP = (
    ("fedavg", "Flower's FedAvg: the example-weighted mean (McMahan et al. 2017)"),
    ("krum", "Flower's Krum (Blanchard et al. 2017)"),
    ("multi-krum", "Flower's MultiKrum: the mean of the n - f best Krum scores"),
    ("bulyan", "Flower's Bulyan (El Mhamdi et al. 2018)"),
    ("median", "Flower's FedMedian: the coordinate-wise median (Yin et al. 2018)"),
    ("trimmed-mean", "Flower's FedTrimmedAvg (beta = --trim-beta)"),
    ("norm-bound", "Norm bounding: clip updates, then average (Sun et al. 2019)"),
    ("fltrust", "FLTrust: trust scores against a root-data update (Cao et al. 2021)"),
)
for _name, _help in _AGGREGATORS_HELP:
    FL_AGGREGATORS.add(_name, _name, help=_help)
AGGREGATORS = tuple(name for name, _ in _AGGREGATORS_HELP)
TEST_FRACTION = 0.2
"""Share of ``data`` the server holds out for evaluation when no ``test_data`` is given."""


@dataclass
class FLConfig:
    """Everything one federated run needs; round-trips through Flower's run config."""

    data: str = "digits"
    test_data: str = ""
    arch: str = ""
    num_clients: int = 10
    rounds: int = 5
    fraction: float = 1.0
    partition: str = "iid"
    alpha: float = 0.5
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    malicious: float = 0.0
    attack: str = ""
    target_class: int = 0
    poison_fraction: float = 0.5
    boost: float = 0.0
    """Backdoor scaling; 0: ``clients per round / malicious clients`` (model replacement)."""
    sign_scale: float = 1.0
    gaussian_sigma: float = 0.1
    aggregator: str = "fedavg"
    num_malicious_assumed: int = -1
    """``f`` of Krum/Bulyan; -1: the actual number of malicious clients (at least 1)."""
    trim_beta: float = 0.2
    norm_bound: float = 0.0
    """Clipping norm of ``norm-bound``; 0: the median update norm of the round."""
    root_size: int = 100
    """FLTrust: clean samples the server trains its reference update on."""
    dp: str = ""
    """``central`` (DP-FedAvg, McMahan et al. 2018), ``local``, or empty for none."""
    noise_multiplier: float = 0.0
    clip: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    secagg: bool = False
    seed: int = 0
    out: str = ""
    bounds_low: float = 0.0
    bounds_high: float = 1.0

    def validate(self) -> FLConfig:
        if self.num_clients < 2:
            raise InvalidConfigError(f"--clients must be >= 2, got {self.num_clients}")
        if self.rounds < 1:
            raise InvalidConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise InvalidConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.partition not in ("iid", "dirichlet"):
            raise InvalidConfigError(
                f"--partition must be iid or dirichlet, got {self.partition!r}"
            )
        if not 0 <= self.malicious < 1:
            raise InvalidConfigError(f"--malicious must be in [0, 1), got {self.malicious}")
        if self.attack and self.attack not in ATTACKS:
            raise InvalidConfigError(
                f"--attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}"
            )
        if self.malicious > 0 and not self.attack:
            raise InvalidConfigError("--malicious needs --attack (what the malicious clients do)")
        if self.attack and self.n_malicious == 0:
            raise InvalidConfigError(
                f"--malicious {self.malicious} of {self.num_clients} clients makes no malicious client"
            )
        if self.aggregator not in AGGREGATORS:
            raise InvalidConfigError(
                f"--aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}"
            )
        if self.dp not in ("", "central", "local"):
            raise InvalidConfigError(f"--dp must be central or local, got {self.dp!r}")
        if self.dp and not (self.noise_multiplier > 0 and self.clip > 0):
            raise InvalidConfigError("--dp needs --noise-multiplier > 0 and --clip > 0")
        if self.dp == "central" and self.aggregator != "fedavg":
            raise InvalidConfigError(
                "central DP is DP-FedAvg: it needs --aggregator fedavg (a clipped, noised mean)"
            )
        if self.secagg and (self.aggregator != "fedavg" or self.dp == "central"):
            raise InvalidConfigError(
                "--secagg hides each update from the server: it works with --aggregator fedavg "
                "only (robust rules and central DP need to see the updates)"
            )
        if self.local_epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InvalidConfigError("--local-epochs, --batch-size must be >= 1 and --lr > 0")
        return self

    @property
    def n_malicious(self) -> int:
        return math.floor(self.malicious * self.num_clients + 1e-9) if self.attack else 0

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.bounds_low, self.bounds_high)

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FLConfig:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in rc:
                default = getattr(cls(), f.name)
                value = rc[key]
                kw[f.name] = type(default)(value) if not isinstance(default, bool) else bool(value)
        return cls(**kw)


def malicious_ids(cfg: FLConfig) -> list[int]:
    """The partition ids of the malicious clients (a seeded choice)."""
    m = cfg.n_malicious
    if m == 0:
        return []
    g = make_generator(cfg.seed + 7)
    return sorted(torch.randperm(cfg.num_clients, generator=g)[:m].tolist())


@lru_cache(maxsize=4)
def _split(
    data: str, test_data: str, seed: int, low: float, high: float
) -> tuple[Dataset, Dataset]:
    ds = load_dataset(data, bounds=(low, high))
    if test_data:
        return ds, load_dataset(test_data, bounds=(low, high))
    test, train = ds.split(TEST_FRACTION, seed=seed)
    return train, test


def train_test(cfg: FLConfig) -> tuple[Dataset, Dataset]:
    """The data the clients share out, and the server's test set."""
    return _split(cfg.data, cfg.test_data, cfg.seed, cfg.bounds_low, cfg.bounds_high)


@lru_cache(maxsize=4)
def _partitions(cfg_key: tuple[Any, ...]) -> list[Tensor]:
    cfg = FLConfig(**dict(cfg_key))
    train, _ = train_test(cfg)
    if cfg.partition == "iid":
        return iid_partition(len(train), cfg.num_clients, seed=cfg.seed)
    return dirichlet_partition(train.y, cfg.num_clients, alpha=cfg.alpha, seed=cfg.seed)


def client_data(cfg: FLConfig, pid: int) -> Dataset:
    """Partition ``pid`` of the training data."""
    if not 0 <= pid < cfg.num_clients:
        raise InvalidConfigError(f"partition-id {pid} is outside [0, {cfg.num_clients})")
    key = tuple(
        sorted(
            (k, v)
            for k, v in asdict(cfg).items()
            if k
            in (
                "data",
                "test_data",
                "seed",
                "num_clients",
                "partition",
                "alpha",
                "bounds_low",
                "bounds_high",
            )
        )
    )
    train, _ = train_test(cfg)
    return train.subset(_partitions(key)[pid])


SMALL_INPUT = 1024
"""Inputs with at most this many features default to an MLP (it learns fastest under
FedAvg's few local SGD steps); larger images to ``small_cnn``."""


def default_arch(input_shape: tuple[int, ...]) -> str:
    return "small_cnn" if len(input_shape) == 3 and math.prod(input_shape) > SMALL_INPUT else "mlp"


def build_model(cfg: FLConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    arch = cfg.arch or default_arch(input_shape)
    torch.manual_seed(cfg.seed)
    return build(arch, input_shape, num_classes)


def float_keys(state: dict[str, Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def flatten(state: dict[str, Tensor], keys: list[str]) -> Tensor:
    return torch.cat([state[k].detach().flatten().double() for k in keys])


def unflatten(vec: Tensor, like: dict[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
    out = {k: v.clone() for k, v in like.items()}
    i = 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i : i + n].view_as(like[k]).to(like[k].dtype).clone()
        i += n
    return out


def local_train(model: nn.Module, x: Tensor, y: Tensor, cfg: FLConfig, seed: int) -> None:
    """SGD (with ``momentum``, reset every round) for ``local_epochs`` over the client's
    data: FedAvg's ClientUpdate."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    g = make_generator(seed)
    model.train()
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean()) if len(y) else float("nan")
