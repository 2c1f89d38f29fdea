"""Devices that are not this process: TVM RPC (tracker, servers, sessions that never hang) and
the emulated arm64 device (its root and its RPC server).

- :mod:`.rpc`: :class:`RpcProcess` (a stock TVM RPC program as a subprocess in its own process
  group), :class:`Tracker`, :class:`Server`, tracker queries with time-outs, ``request_session``;
- :mod:`.arm_root`: builds the private arm64 root (qemu-user + an aarch64 Python with TVM);
- :mod:`.arm_server`: :class:`ArmRpcServer`, the stock RPC server under that Python (one kind
  of :class:`RpcProcess`), and the cross compiler for ARM libraries.

``python -m dcgraph.backends.tvm.remote [--smoke]`` (``make arm-setup``) builds the root.
"""

from ..errors import ArmRpcError, DeviceUnavailable, EmulationUnavailable
from .arm_root import ArmRoot, default_root, ensure_arm_root
from .arm_server import ARM_TARGET, ArmRpcServer, arm_target, cross_compiler, load_on_remote
from .rpc import RpcProcess, Server, Tracker, request_session, tracker_summary

__all__ = ["ARM_TARGET", "ArmRoot", "ArmRpcError", "ArmRpcServer", "DeviceUnavailable",
           "EmulationUnavailable", "RpcProcess", "Server", "Tracker", "arm_target", "cross_compiler",
           "default_root", "ensure_arm_root", "load_on_remote", "request_session", "tracker_summary"]
