"""Importers into Relax: torch.export programs (``from_torch``) and ONNX models (``from_onnx``)."""
