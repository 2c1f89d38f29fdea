"""The operator fusion benchmark suite (issue 8): dcgraph against the peers, side by side.

Installed with the package (``dcgraph.bench``), so it runs from a wheel. One command
(``dcgraph bench [op|model|train|gpu|all] [--quick] [--db DIR] [--out DIR]``, or
``python -m dcgraph.bench ...``) answers: how much does fusing Deep Control save on this
machine, against what a user would otherwise run?

- :mod:`.op_level`: one conv + Deep Control + activation block on the conv shapes of
  ResNet-18, MobileNetV2 (depthwise and 1x1) and an EfficientNet-B0 MBConv block, batch 1
  and 8: conv alone (PyTorch, ONNX Runtime: the floor), Deep Control as plain ops (PyTorch
  eager, ``torch.compile``, ONNX Runtime, TVM's own fusion) and dcgraph's paths (fused
  PyTorch op, ``ai.dcgraph.DeepControlConv`` function in ONNX Runtime, fused TVM kernels
  untuned and tuned);
- :mod:`.model_level`: whole models (ResNet-18-like, MobileNetV2-like) converted to Deep
  Control, inference through every path that takes a whole model;
- :mod:`.train_level`: one training step of the ResNet-18-like model with BatchNorm,
  plain-ops Deep Control and the fused op: time, saved-activation bytes, peak RSS (a fresh
  process per row);
- :mod:`.gpu_level`: the op level on CUDA (PyTorch cuDNN rows, TVM CUDA rows built here and
  run on the GPU machine).

Every row is checked against :mod:`dcgraph.reference` (or the original model) once before it
is timed; a row that fails is reported as failed and not timed. Rows that depend on work not
done yet say "not yet"; rows left out by ``--quick`` or by a missing runtime say "skipped":
no row silently disappears. Results: ``<--out>/fusion_<level>[_quick].{json,md,png}``
(the repository's committed results, ``benchmarks/results``, are one such run).

:mod:`.common` (timing, machine info, result files) and :mod:`.gpu_runtime` (CUDA modules
built here, run elsewhere) serve the suite and the checkout's ``benchmarks/`` scripts alike.
"""
