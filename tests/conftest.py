"""Shared fixtures: a small trained model on disk and its data, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

CLI = [sys.executable, "-m", "modelshield.cli"]

# The test models are tiny: one thread is fastest and keeps timings stable when the
# machine is shared (two threads on two busy cores spin-wait in OpenMP barriers).
torch.set_num_threads(1)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> Run:
    """Run the real ``modelshield`` command in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )
    return Run(p.returncode, p.stdout, p.stderr)


def tiny_net() -> nn.Module:
    """Factory importable as ``tests.conftest:tiny_net`` (1×6×6 inputs, 3 classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


@dataclass
class Bundle:
    model_pt2: Path
    state_dict: Path
    pickle: Path
    data: Path
    train: Path
    module: nn.Module


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A tiny 3-class model trained on separable 1×6×6 blobs, saved in several formats."""
    root = tmp_path_factory.mktemp("bundle")
    g = torch.Generator().manual_seed(0)
    n = 240
    y = torch.arange(n) % 3
    # close blobs: separable, yet broken by L∞ perturbations of ~16/255
    centers = 0.5 + 0.06 * torch.randn(3, 1, 6, 6, generator=g)
    x = (centers[y] + 0.05 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = tiny_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},))
    b = Bundle(
        model_pt2=root / "model.pt2",
        state_dict=root / "weights.pt",
        pickle=root / "full.pt",
        data=root / "test.npz",
        train=root / "train.npz",
        module=net,
    )
    torch.export.save(prog, b.model_pt2)
    torch.save(net.state_dict(), b.state_dict)
    torch.save(net, b.pickle)
    np.savez(b.data, x=x[::2].numpy(), y=y[::2].numpy())
    np.savez(b.train, x=x[1::2].numpy(), y=y[1::2].numpy())
    return b
