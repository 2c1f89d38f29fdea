"""Find the model a command names: a built-in zoo name, or ``package.module:factory``."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from dcgraph import zoo


class ModelSpecError(ValueError):
    """The model specification names nothing usable."""


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """``(model, default input shape or None)`` for a zoo name or ``module:factory``.

    The factory is called with no arguments and must return an ``nn.Module``. Built-in
    BatchNorm models come with non-trivial running statistics (see
    :func:`dcgraph.zoo.randomize_norm_stats`), so that conversions are checked on real numbers.
    """
    if spec in zoo.MODELS:
        factory, shape = zoo.MODELS[spec]
        return zoo.randomize_norm_stats(factory()), shape
    if ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}: use a built-in name "
                             f"({', '.join(zoo.MODELS)}) or package.module:factory")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import {module_name!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model, None


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"bad input shape {text!r}: expected comma-separated integers") from None
    if len(shape) < 3 or any(v < 1 for v in shape):
        raise ValueError(f"bad input shape {text!r}: expected N,C,spatial... with positive sizes")
    return shape


def save_program(program: torch.export.ExportedProgram, path: str) -> None:
    """``torch.export.save`` to ``path`` atomically: a partial file never appears."""
    import os
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".dcgraph-", suffix=".pt2", dir=directory)
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_input(model: nn.Module, example: torch.Tensor, spec: str) -> None:
    """``model`` runs on ``example`` (one forward pass in eval mode), or a :class:`ModelSpecError`
    saying in one line that the input does not fit it."""
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:  # a user model may raise anything for a wrong shape
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ModelSpecError(f"{spec} does not take an input of shape {tuple(example.shape)}: "
                             f"{lines[-1] if lines else type(e).__name__}") from None
