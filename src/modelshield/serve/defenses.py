"""Switchable defences of the serving gateway, one small class each, in one registry.

Three kinds, applied by :class:`~modelshield.serve.app.Gateway` in this order:

* **admission** (before the model runs; per client): ``budget=N`` (query budget, HTTP 403
  once spent), ``rate=R/s`` (token bucket, HTTP 429 with ``Retry-After``), and the block
  of a client that PRADA flagged (``prada=...,action=block``, HTTP 403).
* **detection** (after the model runs, on the client's inputs and predicted classes):
  ``prada=DELTA`` (Juuti et al. 2019; see :mod:`modelshield.serve.detector`).
* **output** (on the probabilities answered, in a fixed order whatever the order given):
  ``noise=SIGMA`` / ``reverse-sigmoid=BETA`` (perturbation), ``top-k=K``, ``round=D``,
  ``label-only`` (labels as integers).

A defence is written ``NAME``, ``NAME=VALUE`` or ``NAME=VALUE,KEY=VALUE,...``, e.g.
``rate=10/s,burst=64``; :func:`parse_defense` turns that into an object and unknown names
fail with the list of known ones. One row of a batch is one query, as in
:class:`~modelshield.core.oracle.Oracle`. State is kept per client and is thread-safe.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from modelshield.core.errors import InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.serve.detector import MAX_N, OodMonitor, PradaMonitor

logger = logging.getLogger(__name__)

__all__ = [
    "GATEWAY_DEFENSES",
    "AdmissionDefense",
    "BudgetDefense",
    "DetectorDefense",
    "GatewayDefense",
    "LabelOnlyDefense",
    "NoiseDefense",
    "OodDefense",
    "OutputDefense",
    "PradaDefense",
    "RateLimitDefense",
    "Rejection",
    "ReverseSigmoidDefense",
    "RoundDefense",
    "TopKDefense",
    "parse_defense",
    "parse_defenses",
]


@dataclass
class Rejection(Exception):
    """A request refused by an admission defence: HTTP ``status``, a one-line ``message``,
    a machine-readable ``code`` and, for 429, seconds until a retry can succeed."""

    status: int
    message: str
    code: str
    retry_after: float | None = None

    def __str__(self) -> str:
        return self.message


class ServedModel(Protocol):
    """What a defence may learn of the served model (:class:`~modelshield.serve.app.Backend`)."""

    input_shape: tuple[int, ...] | None
    num_classes: int | None

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]: ...


class GatewayDefense:
    """Base of every gateway defence. ``public()`` is what ``GET /info`` may show."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def bind(self, model: ServedModel) -> None:
        """Called once by the gateway with the served model, before any request."""
        return None

    def public(self) -> dict[str, Any]:
        return {}

    def client_stats(self, client: str) -> dict[str, Any] | None:
        """Per-client state for the operator's ``GET /stats`` (``None``: nothing kept)."""
        return None

    def spec(self) -> str:
        """The defence written back as ``NAME=VALUE,...`` (parameters as shown publicly)."""
        params = self.public()
        return self.name + "".join(
            ("=" if i == 0 else ",") + f"{k}={v}" for i, (k, v) in enumerate(params.items())
        )


class OutputDefense(GatewayDefense):
    """Changes the scores answered. ``order`` fixes where it runs among output defences."""

    kind: ClassVar[str] = "output"
    order: ClassVar[int] = 0
    labels: ClassVar[bool] = False  # answers labels instead of scores

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` probabilities in, ``(N, C)`` scores (or ``(N,)`` labels) out."""
        raise NotImplementedError


class AdmissionDefense(GatewayDefense):
    """Decides whether a client's request of ``n`` rows is served.

    The gateway calls :meth:`check` for every admission defence, then :meth:`commit` for
    each only if none refused, all under one lock, so a refused request spends nothing.
    """

    kind: ClassVar[str] = "admission"

    def check(self, client: str, n: int, now: float) -> Rejection | None:
        return None

    def commit(self, client: str, n: int, now: float) -> None:
        return None

    def headers(self, client: str) -> dict[str, str]:
        """Extra response headers for a served request (e.g. the budget left)."""
        return {}


class DetectorDefense(AdmissionDefense):
    """Watches each client's stream after the model has answered; may block flagged clients
    (its admission check), and :meth:`observe` may refuse the request that flags one."""

    kind: ClassVar[str] = "detector"

    def observe(
        self,
        client: str,
        x: torch.Tensor,
        labels: torch.Tensor,
        probs: torch.Tensor | None = None,
    ) -> Rejection | None:
        """Feed an answered batch: inputs, predicted classes and the model's probabilities
        (``None`` for a label-only model); a :class:`Rejection` blocks this request."""
        raise NotImplementedError

    def flagged(self, client: str) -> bool:
        return False


# -----------------------------------------------------------------------------------------
# Parsing helpers
# -----------------------------------------------------------------------------------------


def _float(
    text: str | None,
    what: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = ""
        if low is not None:
            rng = f" {'>' if low_open else '>='} {low:g}"
        if high is not None:
            rng += f"{' and' if rng else ''} <= {high:g}"
        raise InvalidConfigError(f"{what} must be a number{rng}, got {text!r}")
    return value


def _int(text: str | None, what: str, *, low: int = 1, high: int | None = None) -> int:
    try:
        value = int(text) if text is not None else None
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise InvalidConfigError(f"{what} must be an integer {bound}, got {text!r}")
    return value


def _no_options(name: str, options: dict[str, str], allowed: Sequence[str] = ()) -> None:
    extra = [k for k in options if k not in allowed]
    if extra:
        known = ", ".join(allowed) or "none"
        raise InvalidConfigError(f"defence {name!r} has no option {extra[0]!r} (options: {known})")


Factory = Callable[[str | None, dict[str, str]], GatewayDefense]
#: Name → ``factory(value, options)`` for ``--defense NAME[=VALUE][,KEY=VALUE...]``.
GATEWAY_DEFENSES: Registry[Factory] = Registry("gateway-defenses", singular="gateway defence")


def parse_defense(spec: str) -> GatewayDefense:
    """Build one defence from ``NAME[=VALUE][,KEY=VALUE...]`` (e.g. ``rate=10/s,burst=20``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidConfigError(f"a defence must be written NAME[=VALUE], got {spec!r}")
    head, *rest = [part.strip() for part in spec.strip().split(",")]
    name, eq, value = head.partition("=")
    name = name.strip().lower()
    options: dict[str, str] = {}
    for part in rest:
        key, eq2, val = part.partition("=")
        if not eq2 or not key.strip():
            raise InvalidConfigError(
                f"defence {spec!r}: options are written KEY=VALUE after a comma, got {part!r}"
            )
        options[key.strip().lower()] = val.strip()
    factory = GATEWAY_DEFENSES.get(name)
    return factory(value.strip() if eq else None, options)


def parse_defenses(specs: Sequence[str]) -> list[GatewayDefense]:
    """Parse several specs; a defence named twice is an error."""
    out = [parse_defense(s) for s in specs]
    names = [d.name for d in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidConfigError(f"defence {dupes[0]!r} is given more than once")
    return out


# -----------------------------------------------------------------------------------------
# Output defences
# -----------------------------------------------------------------------------------------


def _keep_top1(perturbed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Swap entries so each row's top-1 class is the original one (the sum is unchanged)."""
    top = original.argmax(dim=1, keepdim=True)
    new_top = perturbed.argmax(dim=1, keepdim=True)
    at_top = perturbed.gather(1, top)
    at_new = perturbed.gather(1, new_top)
    out = perturbed.scatter(1, new_top, at_top)
    return out.scatter(1, top, at_new)


class _Seeded:
    """A locked torch Generator: seeded from the OS CSPRNG unless a seed is given."""

    def __init__(self, seed: int | None) -> None:
        self._gen = torch.Generator().manual_seed(
            seed if seed is not None else secrets.randbits(63)
        )
        self._lock = threading.Lock()

    def randn(self, shape: torch.Size) -> torch.Tensor:
        with self._lock:
            return torch.randn(shape, generator=self._gen, dtype=torch.float64)


class NoiseDefense(OutputDefense):
    """Multiplicative log-normal noise on the probabilities, renormalised, top-1 kept.

    ``p'_i ∝ p_i · exp(sigma · e_i)`` with ``e_i ~ N(0, 1)`` (Gaussian noise of ``sigma``
    nats on the log-probabilities, so a probability moves by about ``sigma`` of itself
    whatever its size); rows are renormalised with a softmax, and when the noise changes
    the top class the two entries are swapped back, so labels are never altered. This is
    the "output perturbation" family studied against extraction by Tramèr et al. (USENIX
    Security 2016) and Lee et al. (2019); it is not their exact mechanism (see
    ``reverse-sigmoid``). The generator is seeded from the OS CSPRNG unless ``seed`` is
    given (torch's generator itself is not cryptographic).
    """

    name = "noise"
    order = 10

    def __init__(self, sigma: float, seed: int | None = None) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise InvalidConfigError(f"noise sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)
        self._rng = _Seeded(seed)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        p = probs.to(torch.float64)
        logp = torch.log(p.clamp_min(1e-12))
        noisy = torch.softmax(logp + self.sigma * self._rng.randn(p.shape), dim=1)
        return _keep_top1(noisy, p).to(probs.dtype)

    def public(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> NoiseDefense:
        _no_options(cls.name, options, ["seed"])
        seed = _int(options["seed"], "noise seed", low=0) if "seed" in options else None
        return cls(_float(value, "noise sigma", low=0, low_open=True), seed)


class ReverseSigmoidDefense(OutputDefense):
    """Reverse-sigmoid perturbation (Lee, Edwards, Molloy, Srivastava, "Defending Against
    NN Model Stealing Attacks Using Deceptive Perturbations", IEEE S&P Workshops 2019,
    arXiv:1806.00054).

    ``r = beta · (s(gamma · s⁻¹(p)) − 1/2)``, ``p' = α · clip(p − r, 0, 1)`` with ``s`` the
    logistic sigmoid, ``s⁻¹`` the logit and ``α`` renormalising each row. Large ``beta``
    can change the top class; with ``keep_top1`` (default) the two entries are swapped back
    as for ``noise``. A row clipped to all zeros falls back to the original probabilities.
    """

    name = "reverse-sigmoid"
    order = 11

    def __init__(self, beta: float, gamma: float = 0.1, keep_top1: bool = True) -> None:
        if not (math.isfinite(beta) and beta > 0):
            raise InvalidConfigError(f"reverse-sigmoid beta must be > 0, got {beta!r}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise InvalidConfigError(f"reverse-sigmoid gamma must be > 0, got {gamma!r}")
        self.beta, self.gamma, self.keep_top1 = float(beta), float(gamma), bool(keep_top1)

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        p = probs.to(torch.float64)
        q = p.clamp(1e-9, 1 - 1e-9)
        r = self.beta * (torch.sigmoid(self.gamma * torch.logit(q)) - 0.5)
        out = (p - r).clamp(0.0, 1.0)
        total = out.sum(dim=1, keepdim=True)
        out = torch.where(total > 0, out / total.clamp_min(1e-300), p)
        if self.keep_top1:
            out = _keep_top1(out, p)
        return out.to(probs.dtype)

    def public(self) -> dict[str, Any]:
        return {"beta": self.beta, "gamma": self.gamma, "keep_top1": self.keep_top1}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> ReverseSigmoidDefense:
        _no_options(cls.name, options, ["gamma", "keep_top1"])
        gamma = _float(options.get("gamma", "0.1"), "reverse-sigmoid gamma", low=0, low_open=True)
        keep = options.get("keep_top1", "true").lower()
        if keep not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidConfigError(
                f"reverse-sigmoid keep_top1 must be true or false, got {keep!r}"
            )
        beta = _float(value, "reverse-sigmoid beta", low=0, low_open=True)
        return cls(beta, gamma, keep in ("true", "1", "yes"))


class TopKDefense(OutputDefense):
    """Answer only the ``k`` largest probabilities; the others are 0 (not renormalised),
    as :func:`~modelshield.core.oracle.restrict_output` does for ``QueryAccess.top_k``."""

    name = "top-k"
    order = 20

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidConfigError(f"top-k k must be an integer >= 1, got {k!r}")
        self.k = k

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        if self.k >= probs.shape[1]:
            return probs
        top = probs.topk(self.k, dim=1).indices
        return torch.zeros_like(probs).scatter(1, top, probs.gather(1, top))

    def public(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> TopKDefense:
        _no_options(cls.name, options)
        return cls(_int(value, "top-k k"))


class RoundDefense(OutputDefense):
    """Round probabilities to ``decimals`` places (Tramèr et al., USENIX Security 2016,
    "Stealing Machine Learning Models via Prediction APIs", §8 rounding confidences)."""

    name = "round"
    order = 30

    def __init__(self, decimals: int) -> None:
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 8:
            raise InvalidConfigError(
                f"round decimals must be an integer in [0, 8], got {decimals!r}"
            )
        self.decimals = decimals

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.round(probs, decimals=self.decimals)

    def public(self) -> dict[str, Any]:
        return {"decimals": self.decimals}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> RoundDefense:
        _no_options(cls.name, options)
        return cls(_int(value, "round decimals", low=0, high=8))


class LabelOnlyDefense(OutputDefense):
    """Answer the top-1 label only, as an integer (the strongest output restriction)."""

    name = "label-only"
    order = 100
    labels = True

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.argmax(dim=1)

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> LabelOnlyDefense:
        if value is not None and value.lower() not in ("", "true", "1", "yes"):
            raise InvalidConfigError(f"label-only takes no value, got {value!r}")
        _no_options(cls.name, options)
        return cls()


# -----------------------------------------------------------------------------------------
# Admission defences
# -----------------------------------------------------------------------------------------

_PER = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "day": 86400.0}


def _parse_rate(text: str | None) -> float:
    """``"10/s"``, ``"600/min"``, ``"5000/h"`` or a bare number (per second) → per second."""
    if text is None:
        raise InvalidConfigError("rate needs a value, e.g. rate=10/s or rate=600/min")
    count, slash, unit = text.partition("/")
    per = _PER.get(unit.strip().lower()) if slash else 1.0
    if per is None:
        raise InvalidConfigError(
            f"rate unit must be one of s, min, h, day, got {unit!r} (e.g. rate=10/s)"
        )
    return _float(count, "rate", low=0, low_open=True) / per


class RateLimitDefense(AdmissionDefense):
    """Per-client token bucket of ``rate`` queries (rows) per second, ``burst`` deep.

    A request of ``n`` rows is admitted when the bucket holds ``min(n, burst)`` tokens,
    then ``n`` are taken (the bucket may go negative), so a batch larger than ``burst`` is
    never refused for good, yet the long-run rate stays ``rate``. A refused request gets
    HTTP 429 with ``Retry-After`` (whole seconds, rounded up) and spends nothing.
    """

    name = "rate"

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise InvalidConfigError(f"rate must be > 0 queries per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise InvalidConfigError(f"rate burst must be >= 1, got {burst!r}")
        self._buckets: dict[str, list[float]] = {}  # client -> [tokens, last refill time]
        self._lock = threading.Lock()

    def _refill(self, client: str, now: float) -> list[float]:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = [self.burst, now]
        elapsed = max(0.0, now - bucket[1])
        bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
        bucket[1] = now
        return bucket

    def check(self, client: str, n: int, now: float) -> Rejection | None:
        with self._lock:
            tokens = self._refill(client, now)[0]
        need = min(float(n), self.burst)
        if tokens >= need:
            return None
        wait = (need - tokens) / self.rate
        return Rejection(
            429,
            f"rate limit of {self.rate:g} queries/s exceeded (burst {self.burst:g}); "
            f"retry in {wait:.2f} s",
            "rate_limited",
            retry_after=wait,
        )

    def commit(self, client: str, n: int, now: float) -> None:
        with self._lock:
            self._refill(client, now)[0] -= n

    def public(self) -> dict[str, Any]:
        return {"per_second": self.rate, "burst": self.burst}

    def client_stats(self, client: str) -> dict[str, Any] | None:
        with self._lock:
            bucket = self._buckets.get(client)
            return None if bucket is None else {"tokens": round(bucket[0], 3)}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> RateLimitDefense:
        _no_options(cls.name, options, ["burst"])
        burst = _float(options["burst"], "rate burst", low=1) if "burst" in options else None
        return cls(_parse_rate(value), burst)


class BudgetDefense(AdmissionDefense):
    """A lifetime query budget per client (rows). A request that would pass it is refused
    whole with HTTP 403 (code ``budget_exhausted``), as :class:`Oracle` refuses a query
    that would exceed ``max_queries``; served replies carry ``X-Query-Budget-Remaining``.
    """

    name = "budget"

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidConfigError(f"budget must be an integer >= 1, got {limit!r}")
        self.limit = limit
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, client: str, n: int, now: float) -> Rejection | None:
        with self._lock:
            used = self._used.get(client, 0)
        if used + n <= self.limit:
            return None
        left = self.limit - used
        what = "spent" if left <= 0 else f"nearly spent: {left} left, this request asks {n}"
        return Rejection(
            403,
            f"query budget of {self.limit} for this client {what} ({used} used)",
            "budget_exhausted",
        )

    def commit(self, client: str, n: int, now: float) -> None:
        with self._lock:
            self._used[client] = self._used.get(client, 0) + n

    def headers(self, client: str) -> dict[str, str]:
        return {"X-Query-Budget-Remaining": str(self.limit - self._used.get(client, 0))}

    def public(self) -> dict[str, Any]:
        return {"queries": self.limit}

    def client_stats(self, client: str) -> dict[str, Any] | None:
        used = self._used.get(client)
        return None if used is None else {"used": used, "remaining": self.limit - used}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> BudgetDefense:
        _no_options(cls.name, options)
        return cls(_int(value, "budget"))


# -----------------------------------------------------------------------------------------
# Detection
# -----------------------------------------------------------------------------------------

PRADA_ACTIONS = ("flag", "block")


class PradaDefense(DetectorDefense):
    """PRADA extraction detection per client (Juuti et al., EuroS&P 2019).

    Each client's queries feed a :class:`~modelshield.serve.detector.PradaMonitor`; when
    the Shapiro–Wilk ``W`` of its distance list falls below ``delta`` the client is
    flagged (logged as a warning, shown in ``GET /stats``). With ``action="block"`` a
    flagged client's later requests, the request that flagged it and any of its requests
    still in flight get HTTP 403 (code ``extraction_suspected``). Its admission check only
    enforces blocks; the detection runs in :meth:`observe`, after the model has predicted
    the classes.
    """

    name = "prada"

    def __init__(
        self,
        delta: float = 0.9,
        *,
        action: str = "flag",
        min_samples: int = 100,
        outlier_z: float | None = 3.0,
        window: int = MAX_N,
        test_every: int = 1,
    ) -> None:
        if action not in PRADA_ACTIONS:
            raise InvalidConfigError(f"prada action must be flag or block, got {action!r}")
        self.action = action
        self._params: dict[str, Any] = {
            "delta": float(delta),
            "min_samples": int(min_samples),
            "outlier_z": outlier_z,
            "window": int(window),
            "test_every": int(test_every),
        }
        PradaMonitor(**self._params)  # validate now, not at the first query
        self._monitors: dict[str, PradaMonitor] = {}
        self._lock = threading.Lock()

    @property
    def delta(self) -> float:
        return float(self._params["delta"])

    def monitor(self, client: str) -> PradaMonitor:
        with self._lock:
            mon = self._monitors.get(client)
            if mon is None:
                mon = self._monitors[client] = PradaMonitor(**self._params)
            return mon

    def _blocked(self) -> Rejection:
        return Rejection(
            403,
            "this client is blocked: its query stream was flagged as a model-extraction "
            "attack (PRADA)",
            "extraction_suspected",
        )

    def check(self, client: str, n: int, now: float) -> Rejection | None:
        if self.action != "block":
            return None
        with self._lock:
            mon = self._monitors.get(client)
        return self._blocked() if mon is not None and mon.flagged else None

    def observe(
        self,
        client: str,
        x: torch.Tensor,
        labels: torch.Tensor,
        probs: torch.Tensor | None = None,
    ) -> Rejection | None:
        """Feed the client's inputs and predicted classes; a block if this flags it."""
        mon = self.monitor(client)
        if mon.flagged and self.action == "block":  # flagged while this one was in flight
            return self._blocked()
        if mon.update(x, labels):
            last = mon.last
            logger.warning(
                "PRADA flagged client %r after %d queries (W=%.4f < delta=%.3f)%s",
                client,
                mon.flagged_at,
                last.w if last is not None else float("nan"),
                self.delta,
                "; blocking it" if self.action == "block" else "",
            )
            if self.action == "block":
                return self._blocked()
        return None

    def flagged(self, client: str) -> bool:
        with self._lock:
            mon = self._monitors.get(client)
        return mon is not None and mon.flagged

    def public(self) -> dict[str, Any]:
        # The threshold and sample sizes would help an attacker pace its queries: not shown.
        return {}

    def client_stats(self, client: str) -> dict[str, Any] | None:
        with self._lock:
            mon = self._monitors.get(client)
        return None if mon is None else {"action": self.action, **mon.stats()}

    def config(self) -> dict[str, Any]:
        """Full parameters (for the operator, not for ``/info``)."""
        return {"action": self.action, **self._params}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> PradaDefense:
        allowed = ["action", "min_samples", "outlier_z", "window", "test_every"]
        _no_options(cls.name, options, allowed)
        delta = _float(
            value if value is not None else "0.9", "prada delta", low=0, high=1, low_open=True
        )
        outlier = options.get("outlier_z")
        return cls(
            delta,
            action=options.get("action", "flag").lower(),
            min_samples=_int(options.get("min_samples", "100"), "prada min_samples", low=3),
            outlier_z=None
            if outlier is not None and outlier.lower() in ("none", "off", "0")
            else _float(outlier or "3", "prada outlier_z", low=0, low_open=True),
            window=_int(options.get("window", str(MAX_N)), "prada window", low=3, high=MAX_N),
            test_every=_int(options.get("test_every", "1"), "prada test_every"),
        )


def _bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidConfigError(f"{what} must be true or false, got {text!r}")
    return value in ("true", "1", "yes")


class OodDefense(DetectorDefense):
    """Out-of-distribution stream detection per client: the model's confidences (maximum
    softmax probability, Hendrycks & Gimpel 2017) and predicted classes of each client's
    queries, tested against those of a reference set of benign inputs (two-sample
    Kolmogorov–Smirnov and chi-square tests, alpha spending over the repeated tests so a
    benign client's lifetime false-flag probability is at most ``alpha``); see
    :class:`~modelshield.serve.detector.OodMonitor`.

    Complements PRADA: it flags a Knockoff-style stream from a pool unlike the owner's
    data (noise, other datasets, augmented samples the model is unsure of), which PRADA's
    distance test does not see; like any such monitor it cannot tell an attacker with
    in-distribution data from a user. ``reference`` holds the benign inputs (e.g. the
    owner's validation data; ``modelshield serve --reference-data PATH``); without it the
    gateway refuses to start. With ``action="block"`` a flagged client's later requests,
    the request that flagged it and any of its requests still in flight get HTTP 403
    (code ``extraction_suspected``).
    """

    name = "ood"
    MIN_REFERENCE = 20

    def __init__(
        self,
        alpha: float = 1e-4,
        *,
        reference: torch.Tensor | None = None,
        action: str = "flag",
        min_samples: int = 100,
        test_every: int = 50,
        window: int = 5000,
        classes: bool = True,
    ) -> None:
        if action not in PRADA_ACTIONS:
            raise InvalidConfigError(f"ood action must be flag or block, got {action!r}")
        self.action = action
        self.reference = reference
        self._params: dict[str, Any] = {
            "alpha": float(alpha),
            "min_samples": int(min_samples),
            "test_every": int(test_every),
            "window": int(window),
            "classes": bool(classes),
        }
        # validate now, not at the first query
        OodMonitor(None, torch.zeros(1, dtype=torch.long), 2, **{**self._params, "classes": True})
        self._ref_conf: torch.Tensor | None = None
        self._ref_classes: torch.Tensor | None = None
        self._num_classes = 0
        self._monitors: dict[str, OodMonitor] = {}
        self._lock = threading.Lock()

    @property
    def alpha(self) -> float:
        return float(self._params["alpha"])

    @property
    def bound(self) -> bool:
        return self._ref_classes is not None

    def bind(self, model: ServedModel) -> None:
        """Run the served model on the reference inputs (in chunks) and keep their
        confidences and predicted classes."""
        ref = self.reference
        if ref is None:
            raise InvalidConfigError(
                "defence 'ood' needs a reference set of benign inputs "
                "(modelshield serve --reference-data PATH, e.g. the owner's validation data)"
            )
        ref = torch.as_tensor(ref).detach().to("cpu", torch.float32)
        if ref.ndim == 0 or int(ref.shape[0]) < self.MIN_REFERENCE:
            have = 0 if ref.ndim == 0 else int(ref.shape[0])
            raise InvalidConfigError(
                f"ood reference set has {have} inputs; it needs at least {self.MIN_REFERENCE}"
            )
        shape = model.input_shape
        if shape is not None and tuple(ref.shape[1:]) != tuple(shape):
            if math.prod(ref.shape[1:]) != math.prod(shape):
                raise InvalidConfigError(
                    f"ood reference inputs have shape {tuple(ref.shape[1:])}; the model takes "
                    f"{tuple(shape)}"
                )
            ref = ref.reshape((int(ref.shape[0]), *shape))
        confs: list[torch.Tensor] = []
        classes: list[torch.Tensor] = []
        for i in range(0, int(ref.shape[0]), 1024):
            probs, labels = model.predict(ref[i : i + 1024])
            classes.append(labels.detach().reshape(-1).to("cpu", torch.long))
            if probs is not None:
                confs.append(probs.detach().to("cpu", torch.float64).max(dim=1).values)
        ref_classes = torch.cat(classes)
        num = model.num_classes or int(ref_classes.max()) + 1
        conf = torch.cat(confs) if len(confs) == len(classes) else None
        if conf is None and not self._params["classes"]:
            raise InvalidConfigError(
                "ood: the model answers labels only, so only the class test can run; "
                "do not disable it (classes=false)"
            )
        with self._lock:
            self._ref_conf, self._ref_classes, self._num_classes = conf, ref_classes, num
            self._monitors.clear()
        logger.info(
            "ood: reference set of %d inputs (median confidence %s)",
            len(ref_classes),
            "n/a" if conf is None else f"{float(conf.median()):.4f}",
        )

    def monitor(self, client: str) -> OodMonitor:
        with self._lock:
            mon = self._monitors.get(client)
            if mon is None:
                if self._ref_classes is None:
                    raise InvalidConfigError("ood defence used before the gateway bound it")
                mon = self._monitors[client] = OodMonitor(
                    self._ref_conf, self._ref_classes, self._num_classes, **self._params
                )
            return mon

    def _blocked(self) -> Rejection:
        return Rejection(
            403,
            "this client is blocked: its query stream was flagged as a model-extraction "
            "attack (out-of-distribution queries)",
            "extraction_suspected",
        )

    def check(self, client: str, n: int, now: float) -> Rejection | None:
        if self.action != "block":
            return None
        with self._lock:
            mon = self._monitors.get(client)
        return self._blocked() if mon is not None and mon.flagged else None

    def observe(
        self,
        client: str,
        x: torch.Tensor,
        labels: torch.Tensor,
        probs: torch.Tensor | None = None,
    ) -> Rejection | None:
        """Feed the answered batch's probabilities and classes; a block if this flags it."""
        mon = self.monitor(client)
        if mon.flagged and self.action == "block":  # flagged while this one was in flight
            return self._blocked()
        if mon.update(probs, labels):
            logger.warning(
                "ood monitor flagged client %r after %d queries (%s test, p=%.3g below its "
                "level %.3g)%s",
                client,
                mon.flagged_at,
                mon.flagged_by,
                mon.last.get(f"{mon.flagged_by}_p", float("nan")),
                mon.last.get("level", float("nan")),
                "; blocking it" if self.action == "block" else "",
            )
            if self.action == "block":
                return self._blocked()
        return None

    def flagged(self, client: str) -> bool:
        with self._lock:
            mon = self._monitors.get(client)
        return mon is not None and mon.flagged

    def public(self) -> dict[str, Any]:
        # The level and test schedule would help an attacker pace its queries: not shown.
        return {}

    def client_stats(self, client: str) -> dict[str, Any] | None:
        with self._lock:
            mon = self._monitors.get(client)
        return None if mon is None else {"action": self.action, **mon.stats()}

    def config(self) -> dict[str, Any]:
        """Full parameters (for the operator, not for ``/info``)."""
        size = None if self._ref_classes is None else int(self._ref_classes.numel())
        return {"action": self.action, **self._params, "reference_size": size}

    @classmethod
    def from_spec(cls, value: str | None, options: dict[str, str]) -> OodDefense:
        allowed = ["action", "min_samples", "test_every", "window", "classes"]
        _no_options(cls.name, options, allowed)
        alpha = _float(value if value else "1e-4", "ood alpha", low=0, high=1, low_open=True)
        if alpha >= 1:
            raise InvalidConfigError(f"ood alpha must be < 1, got {value!r}")
        return cls(
            alpha,
            action=options.get("action", "flag").lower(),
            min_samples=_int(options.get("min_samples", "100"), "ood min_samples", low=10),
            test_every=_int(options.get("test_every", "50"), "ood test_every"),
            window=_int(options.get("window", "5000"), "ood window", low=10),
            classes=_bool(options.get("classes", "true"), "ood classes"),
        )


for _cls in (
    NoiseDefense,
    ReverseSigmoidDefense,
    TopKDefense,
    RoundDefense,
    LabelOnlyDefense,
    RateLimitDefense,
    BudgetDefense,
    PradaDefense,
    OodDefense,
):
    GATEWAY_DEFENSES.add(_cls.name, _cls.from_spec, help=(_cls.__doc__ or "").strip())
