"""``modelshield scan --demo``: train a small model on bundled data, then scan it.

The demo goes through the same path as a user's scan: the model is saved as a
``torch.export`` program and the data as ``.npz`` files, then loaded back from disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from modelshield.core.architectures import build
from modelshield.core.data import load_dataset
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.core.seeding import seed_everything
from modelshield.core.train import train_classifier

logger = logging.getLogger(__name__)

DEMO_ARCH = "small_cnn"
DEMO_EPOCHS = 15


def prepare_demo(folder: str | Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Train the demo model on scikit-learn's digits; return (model, train, test) paths.

    Files already made with the same seed are reused, so a resumed demo scan sees the
    same inputs.
    """
    folder = Path(folder)
    model_path, train_path, test_path = (
        folder / "model.pt2",
        folder / "train.npz",
        folder / "test.npz",
    )
    stamp = folder / "demo.json"
    meta = {"seed": seed, "arch": DEMO_ARCH, "epochs": DEMO_EPOCHS, "data": "bundled:digits"}
    if stamp.exists() and all(p.exists() for p in (model_path, train_path, test_path)):
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == meta:
                logger.info("demo: reusing the model trained earlier in %s", folder)
                return model_path, train_path, test_path
        except (OSError, json.JSONDecodeError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    full = load_dataset("digits")
    train, test = full.split(0.7, seed=seed)
    logger.info("demo: training %s on %d digits (%d held out)", DEMO_ARCH, len(train), len(test))
    seed_everything(seed)  # weight initialisation draws from the global generator
    module = build(DEMO_ARCH, tuple(train.x.shape[1:]), full.num_classes)
    train_classifier(module, train.x, train.y, epochs=DEMO_EPOCHS, lr=3e-3, seed=seed)
    with torch.no_grad():
        acc = float((module(test.x).argmax(1) == test.y).float().mean())
    logger.info("demo: test accuracy %.1f%%", 100 * acc)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(module, (train.x[:2],), dynamic_shapes=({0: batch},))
    with atomic_open(model_path, "wb") as fh:
        torch.export.save(program, fh)
    train.to_npz(train_path)
    test.to_npz(test_path)
    atomic_write_json(stamp, meta)
    return model_path, train_path, test_path
