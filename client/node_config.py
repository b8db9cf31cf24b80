"""The hospital's own settings for one message, read once from its node config into a typed record.

``flower-supernode --node-config`` carries what ``fedcare node start`` wrote from hospital.toml
(``fedcare.node_settings``); an in-process simulation gives every virtual hospital stand-in defaults
instead. The node config wins over those defaults. Nothing here comes from the coordinator's message;
only a shared ``data-root`` and ``ledger-dir`` may come from the run config, as before. The privacy
policy keys are read by ``client.node_policy.NodePolicy``, not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from client.datasets import DataSource
from fedcare.config_values import typed
from fedcare.errors import FedcareError
from fedcare.run_config import RunSettings

DEFAULT_LEDGER_DIR = "fedcare-ledgers"
DEFAULT_CACHE_DIR = "fedcare-cache"
DEFAULT_IMAGE_SIZE = RunSettings().image_size  # what a run asks for unless it says otherwise


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Which data, where the private state is, and who this hospital is on its consortium roster."""

    ledger_dir: str = DEFAULT_LEDGER_DIR
    partition_id: int | None = None
    data_root: str | None = None
    data_path: str | None = None
    labels: str | None = None
    schema: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    multiframe: str = "first"
    require_deidentified: bool = True
    on_unreadable: str = "error"
    dataset_id: str | None = None  # the identity its privacy ledger is kept under (hospital.toml)
    secagg_name: str | None = None  # its name on the consortium roster
    secagg_roster: str | None = None
    secagg_identity_key: str = ""

    @classmethod
    def read(
        cls, node_config: Mapping[str, Any], defaults: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> NodeConfig:
        """The settings from ``node_config``, else the simulation's ``defaults``; a malformed value is
        named (a ``FedcareError``), never guessed."""

        def setting(key: str, fallback: Any = None) -> Any:
            for source in (node_config, defaults):
                if key in source:
                    return source[key]
            return fallback

        def text(key: str) -> str | None:
            value = setting(key)
            return None if value in (None, "") else str(value)

        return cls(
            ledger_dir=str(setting("ledger-dir", run_config.get("ledger-dir", DEFAULT_LEDGER_DIR))),
            partition_id=_partition(setting("partition-id")),
            data_root=text("data-root") or (str(run_config["data-root"]) if run_config.get("data-root") else None),
            data_path=text("data-path"),
            labels=text("labels"),
            schema=text("schema"),
            cache_dir=str(setting("cache-dir", DEFAULT_CACHE_DIR)),
            multiframe=str(setting("multiframe", "first")),
            require_deidentified=flag(setting("require-deidentified", True)),
            on_unreadable=str(setting("on-unreadable", "error")),
            dataset_id=text("dataset-id"),
            secagg_name=text("secagg-name"),
            secagg_roster=text("secagg-roster"),
            secagg_identity_key=str(setting("secagg-identity-key", "")),
        )

    def data_source(self, image_size: int = DEFAULT_IMAGE_SIZE, task: str = "classify") -> DataSource:
        """Where this hospital's data is and how to read it: the one way a ``DataSource`` is built
        (the ClientApp, ``fedcare node start``'s data check and ``fedcare simulate``/``data check``)."""
        return DataSource(
            partition_id=self.partition_id,
            data_root=self.data_root,
            data_path=self.data_path,
            labels=self.labels,
            schema=self.schema,
            cache_dir=self.cache_dir,
            image_size=image_size,
            multiframe=self.multiframe,
            require_deidentified=self.require_deidentified,
            on_unreadable=self.on_unreadable,
            task=task,
        )


def flag(value: Any) -> bool:
    """A node-config switch: text is true unless false/0/no/off."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def _partition(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return typed(value, "int")
    except ValueError:
        raise FedcareError(
            "the node config's partition-id is not a whole number",
            "set [data] partition-id in hospital.toml to a whole number",
        ) from None
