"""The project's own Python packages: the one list of what fedcare ships.

The wheel (``[tool.hatch.build.targets.wheel] packages``) and the FAB (``[tool.flwr.app]
fab-include``) in pyproject.toml hold the same list (TOML cannot import it; a test keeps them
equal), and code that must tell the project's modules from third-party ones (the warm ClientApp
executor purging them before it forks) reads it from here.
"""

from __future__ import annotations

PACKAGES: tuple[str, ...] = (
    "fedcare",
    "client",
    "server",
    "shared_models",
    "secure_aggregation",
    "audit",
    "simulation",
)
