"""dcgraph: Deep Control (arXiv 1706.03907) from the paper to fused kernels.

Importing the package registers the custom ops ``torch.ops.dcgraph.conv_deep_control`` and
its backward (needed before loading a saved ``torch.export`` archive that uses them).
"""

from dcgraph import ops  # noqa: F401  (registers torch.ops.dcgraph.*)
from dcgraph.functional import conv_deep_control, deep_control
from dcgraph.nn import (
    DeepControl1d,
    DeepControl2d,
    DeepControl3d,
    DeepControlConv1d,
    DeepControlConv2d,
    DeepControlConv3d,
)

__version__ = "0.1.0"

__all__ = [
    "DeepControl1d",
    "DeepControl2d",
    "DeepControl3d",
    "DeepControlConv1d",
    "DeepControlConv2d",
    "DeepControlConv3d",
    "__version__",
    "conv_deep_control",
    "deep_control",
]
