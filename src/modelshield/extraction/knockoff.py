"""Knockoff Nets (Orekondy, Schiele & Fritz, CVPR 2019, "Knockoff Nets: Stealing
Functionality of Black-Box Models").

The attacker holds a surrogate pool of inputs (another data set, or unlabelled data from
the task), queries the victim on samples of it, and trains a copy on the answers: soft
labels (cross-entropy to the victim's distribution) when the API returns scores, hard
labels when it returns only the top-1 class.

Sampling strategies (Section 4.1):

* ``"random"``: the pool is sampled uniformly without replacement.
* ``"adaptive"``: a gradient bandit over *actions* (subsets of the pool). The actions are
  the pool's own labels when given (the paper's hierarchy of surrogate classes, flattened),
  else k-means clusters of the pool. At each step an action ``z ~ pi = softmax(H)`` is
  drawn, an unused input of that action is queried, and the reward ``r`` updates the
  preferences ``H(z) += alpha (r - r_bar)(1 - pi(z))``, ``H(z') -= alpha (r - r_bar) pi(z')``
  for ``z' != z`` (``r_bar``: the mean of earlier rewards). Rewards (Section 4.1.2):
  *certainty* (margin between the victim's two highest probabilities), *diversity*
  (``sum_k max(0, y_k - mean of the last Delta answers_k)``), *loss* (cross-entropy of the
  online copy's prediction against the victim's answer); ``"all"`` sums the three, each
  min-max normalised over the rewards seen so far. The online copy the loss reward needs
  is trained as the queries arrive (one Adam step per round on the round's answers plus as
  many replayed earlier ones).

The copy whose fidelity is reported is re-trained from scratch on the transfer set at
every checkpoint (same seed), so the copy at ``queries`` does not depend on which
checkpoints were evaluated on the way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield.core.device import select_device
from modelshield.core.errors import InvalidConfigError
from modelshield.core.oracle import Oracle
from modelshield.core.results import ExtractionResult
from modelshield.core.seeding import check_seed, make_generator
from modelshield.extraction.base import (
    EXTRACTION_ATTACKS,
    ArchSpec,
    Evaluation,
    Victim,
    arch_label,
    as_targets,
    check_budget,
    check_checkpoints,
    check_inputs,
    check_positive_float,
    check_positive_int,
    copy_factory,
    resolve_num_classes,
    soft_outputs,
    train_copy,
)

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "adaptive")
REWARDS = ("certainty", "diversity", "loss", "all")
BANDIT_LR = 0.1
"""Step size alpha of the gradient-bandit preference updates (rewards lie in [0, 1] per type)."""
DIVERSITY_WINDOW = 25
"""Delta: answers the diversity reward compares against."""
ROUND_SIZE = 16
"""Queries per adaptive round: actions drawn from one policy, answers fetched in one call."""


# -- actions for the adaptive strategy ---------------------------------------------------------
def kmeans(x: Tensor, k: int, generator: torch.Generator, iters: int = 25) -> Tensor:
    """Cluster the rows of ``x`` (flattened) into ``k`` groups: k-means++ seeding
    (Arthur & Vassilvitskii 2007), then Lloyd iterations. Returns int64 labels."""
    flat = x.detach().reshape(len(x), -1).float().cpu()
    n = len(flat)
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [flat[first]]
    dist = ((flat - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0:
            break
        idx = int(torch.multinomial(dist / total, 1, generator=generator))
        centers.append(flat[idx])
        dist = torch.minimum(dist, ((flat - flat[idx]) ** 2).sum(1))
    c = torch.stack(centers)
    labels = torch.cdist(flat, c).argmin(1)
    for _ in range(iters):
        new = torch.stack(
            [
                flat[labels == j].mean(0) if bool((labels == j).any()) else c[j]
                for j in range(len(c))
            ]
        )
        new_labels = torch.cdist(flat, new).argmin(1)
        c = new
        if bool((new_labels == labels).all()):
            break
        labels = new_labels
    return labels


class _Normaliser:
    """Running min-max normalisation of one reward type to [0, 1]."""

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf

    def __call__(self, value: float) -> float:
        self.low, self.high = min(self.low, value), max(self.high, value)
        span = self.high - self.low
        return (value - self.low) / span if span > 0 else 0.0


class AdaptiveSampler:
    """The gradient bandit of Knockoff Nets' adaptive strategy over pool actions."""

    def __init__(
        self,
        actions: Tensor,
        *,
        reward: str,
        generator: torch.Generator,
        lr: float = BANDIT_LR,
        window: int = DIVERSITY_WINDOW,
    ) -> None:
        self.names, inverse = torch.unique(actions.cpu(), return_inverse=True)
        self.buckets: list[list[int]] = []
        for a in range(len(self.names)):
            members = (inverse == a).nonzero().flatten()
            perm = torch.randperm(len(members), generator=generator)
            self.buckets.append(members[perm].tolist())
        self.h = torch.zeros(len(self.names), dtype=torch.float64)
        self.reward = reward
        self.gen = generator
        self.lr = lr
        self.window = window
        self.t = 0
        self.baseline = 0.0
        self.counts = [0] * len(self.names)
        self.history: list[Tensor] = []  # recent victim answers (probability rows)
        self.norms = {name: _Normaliser() for name in ("certainty", "diversity", "loss")}
        self.reward_trace: list[float] = []

    def policy(self) -> Tensor:
        alive = torch.tensor([len(b) > 0 for b in self.buckets])
        logits = torch.where(alive, self.h, torch.full_like(self.h, -math.inf))
        return torch.softmax(logits, dim=0)

    def draw(self, m: int) -> tuple[list[int], list[int]]:
        """``m`` pool indices and the action each came from (without replacement)."""
        picks, acts = [], []
        for _ in range(m):
            pi = self.policy()
            a = int(torch.multinomial(pi, 1, generator=self.gen))
            picks.append(self.buckets[a].pop())
            acts.append(a)
            self.counts[a] += 1
        return picks, acts

    def _raw_rewards(self, y: Tensor, pred: Tensor) -> dict[str, float]:
        top2 = y.topk(min(2, len(y))).values
        cert = float(top2[0] - top2[1]) if len(top2) > 1 else float(top2[0])
        if self.history:
            mean = torch.stack(self.history[-self.window :]).mean(0)
            div = float((y - mean).clamp_min(0).sum())
        else:
            div = float(y.sum())
        loss = float(-(y * torch.log(pred.clamp_min(1e-12))).sum())
        return {"certainty": cert, "diversity": div, "loss": loss}

    def update(self, actions: Sequence[int], answers: Tensor, predicted: Tensor) -> None:
        """Observe the rewards of one round (answers as probability rows) and update H."""
        for a, y, p in zip(actions, answers, predicted, strict=True):
            raw = self._raw_rewards(y, p)
            scaled = {name: self.norms[name](v) for name, v in raw.items()}
            r = sum(scaled.values()) if self.reward == "all" else scaled[self.reward]
            self.history.append(y)
            self.t += 1
            baseline = r if self.t == 1 else self.baseline
            pi = self.policy()
            step = self.lr * (r - baseline)
            onehot = torch.zeros_like(self.h)
            onehot[a] = 1.0
            # exhausted actions have pi = 0 and keep their preference
            self.h = self.h + step * (onehot - pi) * (pi > 0)
            self.baseline += (r - self.baseline) / self.t
            self.reward_trace.append(r)

    def summary(self) -> dict[str, Any]:
        return {
            "actions": [n.item() for n in self.names],
            "counts": list(self.counts),
            "policy": [round(float(p), 6) for p in torch.softmax(self.h, 0)],
            "mean_reward": float(sum(self.reward_trace) / max(len(self.reward_trace), 1)),
        }


# -- the attack --------------------------------------------------------------------------------
def _check_args(
    queries: Any, strategy: str, reward: str, epochs: Any, batch_size: Any, lr: Any
) -> None:
    check_positive_int(queries, "queries")
    if strategy not in STRATEGIES:
        raise InvalidConfigError(
            f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
        )
    if reward not in REWARDS:
        raise InvalidConfigError(f"reward must be one of {', '.join(REWARDS)}, got {reward!r}")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_positive_float(lr, "lr")


def _one_hot(targets: Tensor, k: int) -> Tensor:
    return targets if targets.ndim == 2 else F.one_hot(targets, k).float()


@EXTRACTION_ATTACKS.register("knockoff")
def knockoff(
    oracle: Oracle,
    pool: Tensor,
    *,
    queries: int,
    num_classes: int | None = None,
    arch: ArchSpec = None,
    strategy: str = "random",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    x_eval: Tensor | None = None,
    y_eval: Tensor | None = None,
    victim: Victim | None = None,
    checkpoints: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    pool_labels: Tensor | None = None,
    n_actions: int = 10,
    reward: str = "all",
) -> tuple[nn.Module, ExtractionResult]:
    """Knockoff Nets (Orekondy et al. 2019): query the victim on ``queries`` pool samples
    and train a copy on its answers.

    Spends exactly ``queries`` oracle queries (refused up front if the oracle's budget or
    the pool is smaller). ``strategy``: ``"random"`` or ``"adaptive"`` (gradient bandit
    over actions: ``pool_labels`` when given, else ``n_actions`` k-means clusters; rewards
    per ``reward``). At each of ``checkpoints`` (default: five budgets spaced by factors
    of two up to ``queries``) a copy is trained from scratch on the answers so far and
    evaluated on ``x_eval`` (labelled by ``victim``, default the oracle's back-end,
    uncharged), filling ``curve``. ``arch``: a built-in name, ``package.module:factory``
    or a callable; default ``small_cnn`` for images, ``mlp`` otherwise.
    """
    started = time.perf_counter()
    check_seed(seed)
    _check_args(queries, strategy, reward, epochs, batch_size, lr)
    pool = check_inputs(pool, "pool", oracle.input_shape)
    if queries > len(pool):
        raise InvalidConfigError(
            f"queries={queries} exceeds the pool ({len(pool)} inputs); knockoff queries each "
            "pool input at most once"
        )
    input_shape = tuple(int(s) for s in pool.shape[1:])
    dev = select_device(device)
    k = resolve_num_classes(oracle, num_classes)
    soft = soft_outputs(oracle)
    if k is None and not soft:
        raise InvalidConfigError(
            "the oracle answers labels only and does not say how many classes it has; "
            "pass num_classes"
        )
    plan = check_checkpoints(checkpoints, queries)
    if strategy == "adaptive":
        check_positive_int(n_actions, "n_actions", 2)
        if pool_labels is not None and (
            not isinstance(pool_labels, Tensor) or pool_labels.shape != (len(pool),)
        ):
            raise InvalidConfigError(f"pool_labels must be a tensor of shape ({len(pool)},)")
    check_budget(oracle, queries)
    ev = Evaluation(
        x_eval,
        y_eval,
        victim if victim is not None else (oracle if x_eval is not None else None),
        input_shape,
    )
    gen = make_generator(seed)
    arch_name = arch_label(arch, input_shape)
    make: Callable[[], nn.Module] | None = copy_factory(arch, input_shape, k) if k else None

    xs: list[Tensor] = []
    ts: list[Tensor] = []
    curve: list[dict[str, Any]] = []
    copy: nn.Module | None = None
    sampler: AdaptiveSampler | None = None
    online: nn.Module | None = None
    online_opt: torch.optim.Optimizer | None = None
    action_source = None
    if strategy == "random":
        order = torch.randperm(len(pool), generator=gen)[:queries]
    else:
        if pool_labels is not None:
            actions, action_source = pool_labels.detach().cpu().long(), "pool labels"
        else:
            actions = kmeans(pool, n_actions, gen)
            action_source = f"k-means ({int(actions.max()) + 1} clusters)"
        sampler = AdaptiveSampler(actions, reward=reward, generator=gen)

    before = oracle.queries_used
    used = 0
    for stop in plan:
        while used < stop:
            if sampler is None:
                idx = order[used:stop]
                acts: list[int] = []
            else:
                picks, acts = sampler.draw(min(ROUND_SIZE, stop - used))
                idx = torch.tensor(picks, dtype=torch.long)
            xb = pool[idx.to(pool.device)]
            answer = oracle.query(xb)
            if k is None:
                k = int(answer.shape[1])
                make = copy_factory(arch, input_shape, k)
            tb = as_targets(answer.detach().cpu(), oracle.access.output)
            _check_width(tb, k)
            xs.append(xb.detach().cpu())
            ts.append(tb)
            used += len(idx)
            if sampler is not None and make is not None:
                if online is None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        online = make().to(dev)
                    online_opt = torch.optim.Adam(online.parameters(), lr=lr)
                with torch.no_grad():
                    online.eval()
                    pred = torch.softmax(online(xb.to(dev)).float(), 1).cpu()
                sampler.update(acts, _one_hot(tb, k), pred)
                _online_step(online, online_opt, xs, ts, gen, dev)
        if make is None:  # pragma: no cover - set by the first answer
            raise RuntimeError("no answer received before the first checkpoint")
        copy = train_copy(
            make,
            torch.cat(xs),
            torch.cat(ts),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=dev,
        )
        row = ev.measure(copy, used)
        curve.append(row)
        logger.info(
            "knockoff (%s): %d queries, fidelity %s",
            strategy,
            used,
            "n/a" if row["fidelity"] is None else f"{row['fidelity']:.4f}",
        )
    spent = oracle.queries_used - before
    if copy is None:  # pragma: no cover - plan always holds queries >= 1
        raise InvalidConfigError("no checkpoint to train at")
    last = curve[-1]
    details: dict[str, Any] = {
        "strategy": strategy,
        "soft_labels": soft,
        "num_classes": k,
        "arch": arch_name,
        "pool_size": len(pool),
        "training": "re-trained from scratch at every checkpoint",
        "agree": last.get("agree"),
        **ev.details(),
    }
    if sampler is not None:
        details.update(reward=reward, action_source=action_source, bandit=sampler.summary())
    result = ExtractionResult(
        config={
            "queries": queries,
            "strategy": strategy,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "arch": arch_name,
            "checkpoints": plan,
            "access": oracle.access.to_dict(),
            **({"reward": reward, "n_actions": n_actions} if strategy == "adaptive" else {}),
        },
        seed=seed,
        wall_time=time.perf_counter() - started,
        method="knockoff",
        queries_used=spent,
        fidelity=math.nan if last["fidelity"] is None else last["fidelity"],
        accuracy=last["accuracy"],
        victim_accuracy=ev.victim_accuracy,
        curve=[
            {"queries": r["queries"], "fidelity": r["fidelity"], "accuracy": r["accuracy"]}
            for r in curve
        ],
        details=details,
    )
    return copy, result


def _check_width(targets: Tensor, k: int) -> None:
    """The answers must fit the copy's ``k`` outputs."""
    if targets.ndim == 2 and targets.shape[1] != k:
        raise InvalidConfigError(
            f"the oracle answered {targets.shape[1]} scores per input but num_classes={k}"
        )
    if targets.ndim == 1 and len(targets) and int(targets.max()) >= k:
        raise InvalidConfigError(
            f"the oracle answered label {int(targets.max())} but num_classes={k}; pass num_classes"
        )


def _online_step(
    net: nn.Module,
    opt: torch.optim.Optimizer | None,
    xs: list[Tensor],
    ts: list[Tensor],
    gen: torch.Generator,
    device: torch.device,
) -> None:
    """One Adam step of the online copy on the newest answers plus as many replayed ones."""
    if opt is None:
        return
    x_new, t_new = xs[-1], ts[-1]
    if len(xs) > 1:
        x_old, t_old = torch.cat(xs[:-1]), torch.cat(ts[:-1])
        pick = torch.randint(len(x_old), (len(x_new),), generator=gen)
        x_new, t_new = torch.cat([x_new, x_old[pick]]), torch.cat([t_new, t_old[pick]])
    net.train()
    out = net(x_new.to(device))
    tb = t_new.to(device)
    loss = -(tb * F.log_softmax(out, 1)).sum(1).mean() if tb.ndim == 2 else F.cross_entropy(out, tb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
