"""An :class:`~modelshield.core.oracle.Oracle` in front of an ONNX file (onnxruntime)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelshield.core.errors import (
    InvalidConfigError,
    ModelLoadError,
    OracleError,
    UnsupportedModelError,
)
from modelshield.core.oracle import Oracle
from modelshield.core.oracles import _check_raw_output, _to_raw
from modelshield.core.threat import QueryAccess

logger = logging.getLogger(__name__)

# ONNX tensor element types onnxruntime reports, and the numpy dtype we feed them.
_NUMPY_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedModelError(
            "ONNX models need onnxruntime: pip install 'modelshield[onnx]'"
        ) from None
    return onnxruntime


def _static(dim: object) -> int | None:
    """A declared dimension as an int, or ``None`` when it is symbolic or unknown."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class OnnxOracle(Oracle):
    """Black-box access to an ONNX classifier run by onnxruntime.

    ``raw_output`` says what the graph's output is: ``"logits"``, ``"probs"`` or
    ``"label"`` (class indices). ``input_shape``/``num_classes`` are read from the
    declared shapes where they are static; pass them to override or fill in dynamic
    ones. A graph with a fixed batch dimension is fed in slices of that size, the last
    one zero-padded (padding rows are dropped from the answer).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        access: QueryAccess | None = None,
        *,
        input_name: str | None = None,
        output_name: str | None = None,
        raw_output: str = "logits",
        batch_size: int = 256,
        providers: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        name: str = "",
    ) -> None:
        self.raw_output = _check_raw_output(raw_output)
        ort = _import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"ONNX file not found: {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; graph warnings are not ours to show
        try:
            self._session = ort.InferenceSession(
                str(self.path),
                sess_options=options,
                providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"cannot load ONNX file {self.path}: {_one_line(exc)}") from None

        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if input_name is None:
            if len(inputs) != 1:
                raise InvalidConfigError(
                    f"{self.path.name} has {len(inputs)} inputs; pass input_name "
                    f"(one of: {', '.join(inputs)})"
                )
            input_name = next(iter(inputs))
        elif input_name not in inputs:
            raise InvalidConfigError(
                f"input_name={input_name!r} not in {self.path.name} (inputs: {', '.join(inputs)})"
            )
        if output_name is None:
            output_name = self._session.get_outputs()[0].name
        elif output_name not in outputs:
            raise InvalidConfigError(
                f"output_name={output_name!r} not in {self.path.name} "
                f"(outputs: {', '.join(outputs)})"
            )
        self.input_name: str = input_name
        self.output_name: str = output_name

        node_in = inputs[input_name]
        self._dtype = _NUMPY_DTYPES.get(node_in.type)
        if self._dtype is None:
            raise UnsupportedModelError(
                f"input {input_name!r} of {self.path.name} has type {node_in.type}; "
                f"supported: {', '.join(_NUMPY_DTYPES)}"
            )
        in_dims = list(node_in.shape or [])
        if len(in_dims) < 2 and input_shape is None:
            raise UnsupportedModelError(
                f"input {input_name!r} of {self.path.name} has shape {in_dims}; "
                "expected a batch (N, ...)"
            )
        #: Fixed batch size declared by the graph, or ``None`` when the batch is dynamic.
        self.fixed_batch: int | None = _static(in_dims[0]) if in_dims else None
        if input_shape is None:
            declared = [_static(d) for d in in_dims[1:]]
            if all(d is not None for d in declared):
                input_shape = [int(d) for d in declared if d is not None]
        if num_classes is None and self.raw_output != "label":
            out_dims = list(outputs[output_name].shape or [])
            if len(out_dims) == 2:
                num_classes = _static(out_dims[1])
        super().__init__(
            access,
            input_shape=input_shape,
            num_classes=num_classes,
            batch_size=batch_size,
            name=name or self.path.name,
        )
        logger.debug(
            "loaded %s: input %s %s, output %s (%s), fixed batch %s",
            self.path,
            input_name,
            in_dims,
            output_name,
            self.raw_output,
            self.fixed_batch,
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # onnxruntime's own exception types
            raise OracleError(f"onnxruntime failed on {self.path.name}: {_one_line(exc)}") from None
        return np.asarray(out)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(self._dtype, copy=False)
        n = arr.shape[0]
        step = self.fixed_batch
        if step is None:
            out = self._run(arr)
        else:
            parts = []
            for i in range(0, n, step):
                piece = arr[i : i + step]
                rows = piece.shape[0]
                if rows < step:
                    pad = np.zeros((step - rows, *piece.shape[1:]), dtype=piece.dtype)
                    piece = np.concatenate([piece, pad])
                parts.append(self._run(piece)[:rows])
            out = np.concatenate(parts) if parts else np.empty((0,))
        return _to_raw(out, self.raw_output, n, self.num_classes, f"ONNX model {self.path.name}")
