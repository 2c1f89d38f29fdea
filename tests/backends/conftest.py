"""Fixtures for the backend tests: one emulated ARM RPC server per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def arm_remote():
    """A TVM RPC session on the emulated aarch64 server (skips only where set-up is impossible)."""
    from dcgraph.backends.tvm.remote import ArmRpcServer, EmulationUnavailable, ensure_arm_root

    try:
        root = ensure_arm_root()
    except EmulationUnavailable as exc:
        pytest.skip(f"ARM emulation unavailable: {exc}")
    with ArmRpcServer(root) as server:
        yield server.connect()
