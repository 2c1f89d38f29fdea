"""Graph passes (installed as ``dcgraph.passes``): norm -> Deep Control conversion and
conv + Deep Control fusion for torch.fx, torch.export and ONNX graphs. Empty so far."""
