"""Fresh copies of a model's architecture, for the susceptibility probe's retraining."""

from __future__ import annotations

from pathlib import Path

import torch

from modelshield.core.architectures import resnet18, small_cnn
from modelshield.core.loading import load_model
from modelshield.poisoning.audit import fresh_copy


def test_a_module_copy_has_new_weights_and_the_same_shapes() -> None:
    torch.manual_seed(0)
    module = small_cnn((1, 8, 8), 10)
    copy = fresh_copy(module, seed=3)
    for (name, a), (_, b) in zip(module.named_parameters(), copy.named_parameters(), strict=True):
        assert a.shape == b.shape, name
        assert not torch.equal(a, b), name
    assert copy(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_an_exported_graph_copy_resets_batch_norm_to_its_defaults(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = resnet18((3, 8, 8), 10, width=4).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(3.0)
                m.bias.fill_(-1.0)
                m.running_var.fill_(7.0)
    program = torch.export.export(
        module,
        (torch.zeros(2, 3, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},),
    )
    torch.export.save(program, str(tmp_path / "r.pt2"))
    loaded = load_model(str(tmp_path / "r.pt2")).classifier
    assert loaded is not None
    copy = fresh_copy(loaded.module, seed=1)  # type: ignore[arg-type]
    params, buffers = dict(copy.named_parameters()), dict(copy.named_buffers())
    assert bool((params["program.stem.1.weight"] == 1).all())
    assert bool((params["program.stem.1.bias"] == 0).all())
    assert bool((buffers["program.stem.1.running_var"] == 1).all())
    old = dict(loaded.module.named_parameters())  # type: ignore[union-attr]
    assert not torch.equal(params["program.stem.0.weight"], old["program.stem.0.weight"])
    assert all(p.requires_grad for p in params.values())
    out = copy(torch.rand(4, 3, 8, 8))
    assert out.shape == (4, 10) and bool(torch.isfinite(out).all())
