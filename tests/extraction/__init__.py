"""Victims shared by the extraction tests (trained once per session, one thread)."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from modelshield.core.architectures import build
from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.train import train_classifier


@lru_cache(maxsize=1)
def digits_victim() -> tuple[Classifier, Dataset, Dataset]:
    """A 10-class MLP trained on half of the bundled digits; the other half split into
    an attacker's pool (60%) and a held-out evaluation set (40%)."""
    torch.set_num_threads(1)
    data = load_dataset("digits")
    train, rest = data.split(0.5, seed=0)
    held, pool = rest.split(0.4, seed=1)
    torch.manual_seed(0)  # train_classifier seeds after the module is built: seed its init
    net = train_classifier(build("mlp", (1, 8, 8), 10), train.x, train.y, epochs=30, seed=0)
    return from_torch(net, input_shape=(1, 8, 8), num_classes=10), pool, held


@lru_cache(maxsize=1)
def blob_victim() -> tuple[Classifier, torch.Tensor]:
    """A 4-class MLP on 6 uniform features (two nonlinear boundaries) and 1000 held-out
    uniform inputs: the setting of a Jacobian-augmentation attacker with a tiny seed set."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2000, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 1).long() + 2 * (x[:, 2] > x[:, 3]).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    return from_torch(net, input_shape=(6,), num_classes=4), torch.rand(1000, 6, generator=g)
