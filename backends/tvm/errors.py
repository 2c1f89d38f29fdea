"""Every error the TVM backend raises on purpose, each with its reason in one line.

They live here, apart from the code that raises them, so that any module can raise or catch
one without importing another stage (the compiler and the tuner used to import each other
for :class:`CompileError`). The CLI prints any of them as ``dcgraph <command>: error: ...``.

- :class:`CompileError`, :class:`TargetError` (``ValueError``): the request cannot be met as
  asked (a model kind, shape, target or database that does not fit);
- :class:`TuneError`: tuning cannot go on; ``report`` holds what was done;
- :class:`DeviceUnavailable`: no RPC device of the key can be reached;
- :class:`EmulationUnavailable`, :class:`ArmRpcError`: the emulated ARM set-up or its server.
"""

from __future__ import annotations

from typing import Any


class CompileError(ValueError):
    """The model cannot be compiled as asked, with the reason in one line."""


class TargetError(ValueError):
    """A target dcgraph cannot build for, with the reason in one line."""


class TuneError(RuntimeError):
    """Tuning cannot go on, with the reason in one line; ``report`` holds what was done."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class DeviceUnavailable(RuntimeError):
    """No device of the key can be reached through the tracker; ``str(exc)`` is one line."""


class EmulationUnavailable(RuntimeError):
    """ARM emulation cannot be set up on this machine; ``str(exc)`` is a one-line reason."""


class ArmRpcError(RuntimeError):
    """The emulated RPC server failed to start or to register with its tracker."""


__all__ = ["ArmRpcError", "CompileError", "DeviceUnavailable", "EmulationUnavailable", "TargetError",
           "TuneError"]
