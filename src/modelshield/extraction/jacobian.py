"""Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017, "Practical
Black-Box Attacks against Machine Learning", Algorithm 1).

Start from a small seed set ``S_0`` labelled by the victim. At each substitute epoch
``rho``: train the substitute ``F`` on the labelled set, then grow it with
``x + lambda * sign(dF_{y~}(x)/dx)`` for every ``x`` in it, where ``y~`` is the victim's
label of ``x``, and ask the victim to label the new points. The new points lie where the
substitute's output for the victim's label changes fastest, i.e. near its decision
boundaries, which is where the victim's labels are most informative.

Details of this implementation:

* the sign of the Jacobian of the substitute's softmax output ``F_{y~}`` equals the sign
  of the gradient of ``log F_{y~}`` (``grad p = p * grad log p``, ``p > 0``), which is what
  is computed: the same direction without the underflow of saturated probabilities;
* the substitute is trained on the victim's *labels* (the paper's label-only threat
  model), from scratch at each substitute epoch;
* the query budget is never exceeded: when the doubled set would not fit, a random subset
  of the points is augmented, sized to spend exactly what is left; augmented points are
  clipped to ``bounds``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield.core.device import select_device
from modelshield.core.errors import InvalidConfigError
from modelshield.core.oracle import Oracle
from modelshield.core.results import ExtractionResult
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import check_bounds
from modelshield.extraction.base import (
    EXTRACTION_ATTACKS,
    ArchSpec,
    Evaluation,
    Victim,
    arch_label,
    check_budget,
    check_inputs,
    check_positive_float,
    check_positive_int,
    copy_factory,
    resolve_num_classes,
    train_copy,
)

logger = logging.getLogger(__name__)


def jacobian_step(
    substitute: nn.Module,
    x: Tensor,
    labels: Tensor,
    lam: float,
    bounds: tuple[float, float],
    device: torch.device,
) -> Tensor:
    """``clip(x + lam * sign(d log F_label(x) / dx))`` for a batch (Papernot et al. 2017)."""
    substitute.eval()
    out = []
    for i in range(0, len(x), 512):
        xb = x[i : i + 512].to(device).clone().requires_grad_(True)
        logp = F.log_softmax(substitute(xb), dim=1)
        picked = logp.gather(1, labels[i : i + 512].to(device).view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(picked, xb)
        out.append((xb.detach() + lam * grad.sign()).clamp(*bounds).cpu())
    return torch.cat(out)


@EXTRACTION_ATTACKS.register("jacobian")
def jacobian_augmentation(
    oracle: Oracle,
    seed_x: Tensor,
    *,
    queries: int,
    num_classes: int | None = None,
    arch: ArchSpec = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    x_eval: Tensor | None = None,
    y_eval: Tensor | None = None,
    victim: Victim | None = None,
    device: str | torch.device = "cpu",
    lam: float = 0.1,
    rounds: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    tau: int | None = None,
) -> tuple[nn.Module, ExtractionResult]:
    """Substitute training with Jacobian-based dataset augmentation (Papernot et al. 2017).

    Spends at most ``queries`` (the seed set's labels included; exactly ``queries`` when
    ``rounds`` is ``None``, i.e. augmentation continues until the budget is spent).
    ``rounds`` caps the substitute epochs (augmentation steps). ``tau``: the paper's
    periodic step size (Section 6), ``lambda_rho = lam * (-1)^floor(rho / tau)``, so the
    augmentation alternately moves towards and away from the boundaries (``None``: always
    ``+lam``). ``curve`` has one row per
    substitute trained: the seed-only one first, then one per augmentation; the returned
    substitute is trained on every labelled point. Evaluation as in
    :func:`~modelshield.extraction.knockoff.knockoff`.
    """
    started = time.perf_counter()
    check_seed(seed)
    check_positive_int(queries, "queries")
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_positive_float(lr, "lr")
    lam = check_positive_float(lam, "lam")
    if rounds is not None:
        check_positive_int(rounds, "rounds")
    if tau is not None:
        check_positive_int(tau, "tau")
    low, high = check_bounds(bounds)
    seed_x = check_inputs(seed_x, "seed_x", oracle.input_shape)
    if len(seed_x) > queries:
        raise InvalidConfigError(
            f"the seed set ({len(seed_x)} inputs) needs more than queries={queries} to label"
        )
    input_shape = tuple(int(s) for s in seed_x.shape[1:])
    dev = select_device(device)
    k = resolve_num_classes(oracle, num_classes)
    check_budget(oracle, queries)
    ev = Evaluation(
        x_eval,
        y_eval,
        victim if victim is not None else (oracle if x_eval is not None else None),
        input_shape,
    )
    gen = make_generator(seed)
    arch_name = arch_label(arch, input_shape)

    before = oracle.queries_used
    x_all = seed_x.detach().cpu().clamp(low, high)
    y_all = oracle.predict(x_all.to(seed_x.device)).detach().cpu().long()
    used = len(x_all)
    if k is None:
        k = max(int(y_all.max()) + 1, 2)
        logger.warning(
            "jacobian: the oracle does not say how many classes it has; assuming %d from the "
            "seed labels (pass num_classes)",
            k,
        )
    make = copy_factory(arch, input_shape, k)
    curve: list[dict[str, Any]] = []
    rho = 0
    while True:
        substitute = train_copy(
            make, x_all, y_all, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=dev
        )
        row = ev.measure(substitute, used)
        row["round"] = rho
        row["size"] = len(x_all)
        curve.append(row)
        logger.info(
            "jacobian: substitute epoch %d, %d labelled points, fidelity %s",
            rho,
            len(x_all),
            "n/a" if row["fidelity"] is None else f"{row['fidelity']:.4f}",
        )
        left = queries - used
        if left <= 0 or (rounds is not None and rho >= rounds):
            break
        if left >= len(x_all):
            src = torch.arange(len(x_all))
        else:
            src = torch.randperm(len(x_all), generator=gen)[:left].sort().values
        step = lam if tau is None else lam * (-1) ** (rho // tau)
        x_new = jacobian_step(substitute, x_all[src], y_all[src], step, (low, high), dev)
        y_new = oracle.predict(x_new.to(seed_x.device)).detach().cpu().long()
        if int(y_new.max()) >= k:
            raise InvalidConfigError(
                f"the oracle answered label {int(y_new.max())} but num_classes={k}; pass num_classes"
            )
        x_all, y_all = torch.cat([x_all, x_new]), torch.cat([y_all, y_new])
        used += len(x_new)
        rho += 1
    spent = oracle.queries_used - before
    last = curve[-1]
    result = ExtractionResult(
        config={
            "queries": queries,
            "seed_size": len(seed_x),
            "lam": lam,
            "tau": tau,
            "rounds": rounds,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "arch": arch_name,
            "bounds": [low, high],
            "access": oracle.access.to_dict(),
        },
        seed=seed,
        wall_time=time.perf_counter() - started,
        method="jacobian",
        queries_used=spent,
        fidelity=math.nan if last["fidelity"] is None else last["fidelity"],
        accuracy=last["accuracy"],
        victim_accuracy=ev.victim_accuracy,
        curve=[
            {
                "queries": r["queries"],
                "fidelity": r["fidelity"],
                "accuracy": r["accuracy"],
                "round": r["round"],
            }
            for r in curve
        ],
        details={
            "num_classes": k,
            "arch": arch_name,
            "substitute_epochs": rho,
            "labelled_points": len(x_all),
            "labels": "victim top-1 labels (soft scores unused, as in the paper)",
            "training": "re-trained from scratch at every substitute epoch",
            "agree": last.get("agree"),
            **ev.details(),
        },
    )
    return substitute, result
