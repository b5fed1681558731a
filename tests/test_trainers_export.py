"""Export of a trial's best checkpoint to TorchScript and ONNX, checked by running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import trainers
from trainers import export


def trained(tmp_path: Path) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 8, generator=g), torch.randint(0, 3, (128,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    trainers.fit(model, trainers.Data((x, y), (x, y)),
                 trainers.TrainerConfig(epochs=3, device="cpu", checkpoint_dir=str(tmp_path / "ckpt")))
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    return export.load_best(fresh, tmp_path / "ckpt"), x[:5]


def test_best_checkpoint_loads_into_a_fresh_model(tmp_path: Path) -> None:
    model, sample = trained(tmp_path)
    best = trainers.load_checkpoint(tmp_path / "ckpt" / "best.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, best["model"][name])


def test_torchscript_round_trip_matches_the_model(tmp_path: Path) -> None:
    model, sample = trained(tmp_path)
    path = export.to_torchscript(model, sample, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(sample), model(sample))


def test_onnx_round_trip_matches_the_model_for_other_batch_sizes(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, sample = trained(tmp_path)
    path = export.to_onnx(model, sample, tmp_path / "model.onnx")
    other = torch.randn(9, 8)
    (output,) = onnxruntime.InferenceSession(str(path)).run(None, {"input": other.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(other), rtol=1e-4, atol=1e-5)


def test_a_mismatching_export_is_an_error() -> None:
    with pytest.raises(export.ExportMismatchError, match="TorchScript export differs"):
        export._check("TorchScript", torch.zeros(2), torch.ones(2), 1e-5, 1e-6)
