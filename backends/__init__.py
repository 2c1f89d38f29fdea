"""Backends (installed as ``dcgraph.backends``): lowering of the fused op to Apache TVM for
x86, ARM and NVIDIA GPU targets, with MetaSchedule autotuning (:mod:`.tvm`)."""
