"""Flower's own SuperLink app, built for fedcare's two listeners: the one place that touches Flower internals.

Flower 1.41 builds its SuperLink as one FastAPI app (`flwr.superlink.main.create_app`) whose
lifespan (`SuperLinkLifespan`, private, in `flwr.superlink.cli.flower_superlink`) starts the
SuperExec that runs ServerApps; `flower-superlink` then serves that app on one socket. fedcare
serves the same app on two listeners (see `fedcare.superlink_launcher`), so it builds the app
itself, which needs Flower's private lifespan class and config dataclass. Those are internals: they
were read and tested against Flower 1.41.0 only (route layout, lifespan behaviour, what
`enable_supernode_auth` and the certificates drive). On any other Flower version, with Flower
Enterprise installed (its extensions add middleware and lifespan state this design has not seen),
or with Flower's legacy gRPC listeners switched on by environment (they would open a Control API
on 0.0.0.0), `require_verified_flower` refuses with one line: there is no fallback to
Flower's single listener, which would hand the Control API to every hospital.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from fedcare.errors import FedcareError
from fedcare.fleet_allowlist import FLEET_PREFIX, HEALTH_PATH

VERIFIED_FLOWER = "1.41.0"
# Environment switches that make Flower 1.41's lifespan open legacy gRPC Control/Fleet servers.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
SUPEREXEC_STOP_S = 10.0  # Flower waits 1 s for its SuperExec to leave; fedcare waits this long, then kills it


def installed_flower() -> str:
    """The installed Flower version (from its own version module)."""
    from flwr.supercore.version import package_version

    return str(package_version)


def require_verified_flower(
    version: str | None = None, enterprise: bool | None = None, environ: dict[str, str] | None = None
) -> None:
    """Raise FedcareError unless this is the open-source Flower version the two-listener design was verified on."""
    version = installed_flower() if version is None else version
    if version != VERIFIED_FLOWER:
        raise FedcareError(
            f"fedcare's SuperLink launcher was verified against Flower {VERIFIED_FLOWER} and this is Flower "
            f"{version}: refusing to start (Flower's own single listener would expose the Control API to "
            f"every hospital)",
            f"install flwr=={VERIFIED_FLOWER}, or re-verify fedcare/superlink_app.py against {version}",
        )
    if enterprise if enterprise is not None else importlib.util.find_spec("flwr.ee") is not None:
        raise FedcareError(
            "Flower Enterprise (flwr.ee) is installed: fedcare's SuperLink launcher was verified "
            "only without its extensions; refusing to start",
            "run the launcher in an environment with open-source flwr only",
        )
    environ = dict(os.environ) if environ is None else environ
    switched = [name for name in LEGACY_GRPC_SWITCHES if environ.get(name) == "1"]
    if switched:
        raise FedcareError(
            f"{', '.join(switched)}=1 would make Flower open legacy gRPC listeners "
            "(a Control API on 0.0.0.0) beside fedcare's two: refusing to start",
            f"unset {' and '.join(switched)}",
        )


@dataclass(frozen=True)
class FlowerSuperLink:
    """Flower's app, the literal paths of its Fleet API (plus /health), and uvicorn logging in Flower's format."""

    app: Any  # fastapi.FastAPI
    public_paths: frozenset[str]
    log_config: dict[str, Any]


@dataclass(frozen=True)
class ControlListener:
    """The loopback listener for the Control and Runtime APIs: where it binds and its TLS files."""

    host: str
    port: int
    ca_certificate: Path  # the deployment's CA: the SuperExec trusts it to reach this listener
    certificate: Path  # must name ``host``
    key: Path


def _lifespan_config(control: ControlListener, database: str | None, runtime_dependency_install: bool) -> Any:
    """Flower's SuperLink settings: TLS on the control listener, node authentication on, no event logs."""
    from flwr.common.constant import (
        CONTROL_API_DEFAULT_SERVER_ADDRESS,
        ISOLATION_MODE_SUBPROCESS,
        TRANSPORT_TYPE_GRPC_RERE,
    )
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.superlink.config_loader import SuperLinkLifespanConfig, load_control_authn_plugin

    ca_certificate, control_certificate, control_key = control.ca_certificate, control.certificate, control.key
    certificates = (ca_certificate.read_bytes(), control_certificate.read_bytes(), control_key.read_bytes())
    return SuperLinkLifespanConfig(
        control_address=CONTROL_API_DEFAULT_SERVER_ADDRESS,  # used only by the legacy gRPC Control API (refused above)
        health_server_address=None,
        host=control.host,
        port=control.port,
        insecure=False,
        certificates=certificates,
        superexec_auth_secret=None,
        authn_plugin=load_control_authn_plugin(),
        event_log_plugin=None,
        fleet_event_log_plugin=None,
        enable_event_log=False,
        artifact_provider=None,
        enable_supernode_auth=True,
        fleet_api_type=TRANSPORT_TYPE_GRPC_RERE,
        fleet_api_address=None,
        simulation=False,
        ssl_ca_certfile=str(ca_certificate),
        ssl_certfile=str(control_certificate),
        ssl_keyfile=str(control_key),
        database=database if database is not None else FLWR_IN_MEMORY_DB_NAME,
        isolation=ISOLATION_MODE_SUBPROCESS,
        runtime_dependency_install=runtime_dependency_install,
    )


def build_superlink_app(
    control: ControlListener, database: str | None, runtime_dependency_install: bool = False
) -> FlowerSuperLink:
    """Flower's full SuperLink app (Control, Runtime, Fleet), with node authentication on.

    The lifespan's SuperExec connects to the control listener (loopback) over TLS, trusting its CA
    (so its certificate must name that host). ``database`` None keeps Flower's in-memory state.
    """
    require_verified_flower()
    from fastapi.routing import iter_route_contexts
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.main import create_app

    class Lifespan(SuperLinkLifespan):
        """Flower's lifespan, but the SuperExec is given SUPEREXEC_STOP_S to leave, then killed (never orphaned)."""

        def shutdown(self) -> None:
            superexec = self.superexec_process
            super().shutdown()
            if superexec is not None and superexec.poll() is None:
                try:
                    superexec.wait(timeout=SUPEREXEC_STOP_S)
                except subprocess.TimeoutExpired:
                    superexec.kill()
                    superexec.wait()

    config = _lifespan_config(control, database, runtime_dependency_install)
    app = create_app(config, Lifespan)
    routes = [cast(str, c.path) for c in iter_route_contexts(app.routes)]  # every route of Flower's app has a path
    paths = frozenset(p for p in routes if p.startswith(FLEET_PREFIX) or p == HEALTH_PATH)
    if HEALTH_PATH not in paths or f"{FLEET_PREFIX}pull-messages" not in paths:
        raise FedcareError(
            f"Flower's app has no {FLEET_PREFIX}pull-messages or {HEALTH_PATH} route: "
            "its layout is not the one fedcare verified",
            f"install flwr=={VERIFIED_FLOWER}",
        )
    return FlowerSuperLink(app, paths, get_uvicorn_log_config(console_handler.level))
