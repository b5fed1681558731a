"""Export a trained model (typically a trial's best checkpoint) to TorchScript and ONNX.

Each export is checked by running it against the PyTorch model on the sample inputs; an
export whose outputs differ beyond the tolerance is an error, not a silently wrong file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from trainers.checkpoint import load


class ExportMismatchError(RuntimeError):
    """The exported model's outputs differ from the PyTorch model's."""


def load_best(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> torch.nn.Module:
    """Loads ``best.pt`` (or ``last.pt`` when no best was kept) from `checkpoint_dir` into `model`."""
    directory = Path(checkpoint_dir)
    path = directory / "best.pt" if (directory / "best.pt").exists() else directory / "last.pt"
    model.load_state_dict(load(path)["model"])
    return model.eval()


def to_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike,
                   *, rtol: float = 1e-5, atol: float = 1e-6) -> Path:
    """Traces `model` on `example`, saves it, reloads it and compares outputs."""
    model = model.eval().cpu()
    example = example.cpu()
    # TorchScript is deprecated in recent torch but still what many serving stacks load.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        traced.save(str(path))
        _check("TorchScript", model(example), torch.jit.load(str(path))(example), rtol, atol)
    return Path(path)


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike,
            *, rtol: float = 1e-4, atol: float = 1e-5) -> Path:
    """Exports with a dynamic batch dimension and checks the file with onnxruntime
    (needs the ``onnx``, ``onnxscript`` and ``onnxruntime`` packages)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("ONNX export is checked with onnxruntime: pip install onnx onnxscript onnxruntime") from err
    model = model.eval().cpu()
    example = example.cpu()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["output"],
                      dynamic_shapes=({0: batch},), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        _check("ONNX", model(example), torch.from_numpy(output), rtol, atol)
    return Path(path)


def _check(kind: str, expected: torch.Tensor, actual: torch.Tensor, rtol: float, atol: float) -> None:
    if expected.shape != actual.shape or not torch.allclose(expected, actual, rtol=rtol, atol=atol):
        diff = (expected - actual).abs().max().item() if expected.shape == actual.shape else "shape"
        raise ExportMismatchError(f"{kind} export differs from the model (max abs difference {diff})")
