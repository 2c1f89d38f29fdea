"""Graph passes (installed as ``dcgraph.passes``).

- :mod:`dcgraph.passes.fx`: ``convert`` (conv + norm -> Deep Control), ``fuse`` (conv + Deep
  Control [+ act] -> the fused op) and ``rewrite`` (both, optionally verified) on torch.fx
  graphs of any ``nn.Module``.
- :mod:`dcgraph.passes.export`: the same on ``torch.export`` programs (ATen level).
- :class:`RewriteReport`: what matched, what was skipped and why.
"""

from .report import Match, RewriteReport, Skip
from .verify import VerificationError, verify

__all__ = ["Match", "RewriteReport", "Skip", "VerificationError", "verify"]
