"""ONNX files in and out: checked loading, atomic saving (external data too), and running
two models side by side in onnxruntime."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dcgraph.compare import worst_error


class OnnxFileError(ValueError):
    """The input is not a valid ONNX model, or the output cannot be written."""


def uses_external_data(path: str | Path) -> bool:
    proto = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def load_checked(path: str | Path) -> onnx.ModelProto:
    """Load (with external data) and run ``onnx.checker``; clear errors, no tracebacks."""
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise OnnxFileError(f"{path}: not a readable ONNX model ({e})") from e
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxFileError(f"{path}: the ONNX checker rejects the input: {first}") from e
    return model


def save_atomic(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` so that no partial file ever appears there.

    With ``external_data``, the weights go to ``<name>.data`` beside it (both are written in a
    temporary folder next to the target, then moved into place, data first).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxFileError(f"{path}: folder {directory} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=".dcgraph-", dir=directory))
    try:
        target = tmp / path.name
        if external_data:
            onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=0)
            os.replace(tmp / (path.name + ".data"), directory / (path.name + ".data"))
        else:
            onnx.save_model(model, str(target))
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _input_feed(model: onnx.ModelProto, shape: tuple[int, ...] | None, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if shape is not None and len(feed) == 0:
            dims = list(shape)
        if any(d is None for d in dims):
            dims = [2 if (d is None and i == 0) else d for i, d in enumerate(dims)]
            if any(d is None for d in dims):
                raise OnnxFileError(f"input {vi.name!r} has symbolic dims {dims}: give --input-shape")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feed[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feed


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def compare(reference: onnx.ModelProto, candidate: onnx.ModelProto,
            shape: tuple[int, ...] | None = None, seed: int = 0) -> float:
    """Worst relative difference (:func:`dcgraph.compare.worst_error`: NaN, infinity, a shape or
    output-count mismatch give ``inf``) of the two models' outputs in onnxruntime on the same
    random inputs."""
    feed = _input_feed(reference, shape, seed)
    return worst_error(run(candidate, feed), run(reference, feed))[0]
