"""Process environment every local simulation and every process fedcare launches needs: loopback-only
Ray, no phoning home (simulation, the SuperLink launcher, `fedcare deploy` and the Flower CLI calls)."""

from __future__ import annotations

import os

SAFE_ENVIRONMENT = {
    # Without this Ray binds its services to the machine's external address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def apply_safe_environment() -> None:
    """Force the loopback/no-telemetry settings (they are not the user's to weaken here)."""
    os.environ.update(SAFE_ENVIRONMENT)
