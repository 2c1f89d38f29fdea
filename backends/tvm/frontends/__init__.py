"""Importers into Relax: :func:`prepare` (any model kind, the backend's one door), and the two
frontends it dispatches to: torch.export programs (``from_torch``) and ONNX models (``from_onnx``)."""

from .load import as_tuple, import_model, prepare

__all__ = ["as_tuple", "import_model", "prepare"]
