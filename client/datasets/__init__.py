"""Hospital-side data loaders: which local data a node trains on, by dataset name.

Bundled sets (``fed-heart-disease``, and the simulated ``pbc2`` and ``synthetic-imaging``
hospitals under a data root) are found by partition id; a hospital's own data (``dicom``,
``ehr-table``, ``ehr-events``) is found by the paths in its node config. Train/test splits use a
fixed seed, so the same data always gives the same training set and the same privacy ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client.datasets.hospital_data import HospitalData
from fedcare.dataset_registry import dataset_spec
from fedcare.errors import FedcareError
from fedcare.run_config import DATASET_TASKS

if TYPE_CHECKING:  # the EHR loaders are imported only when a hospital holds EHR data
    from client.datasets.ehr_schema import EhrSchema

SPLIT_SEED = 43  # fixed: the training set, hence the ledger, never moves
IMAGE_TEST_FRACTION = 0.3


@dataclass(frozen=True)
class DataSource:
    """Where one node's data is, and how to read it (all hospital-side settings)."""

    partition_id: int | None = None
    data_root: str | None = None  # generated sets: DATA_ROOT/hospital-<partition>
    data_path: str | None = None  # a hospital's own folder (dicom) or table/events file
    labels: str | None = None  # dicom: labels CSV (default DATA_PATH/labels.csv); ehr-events with
    # label-source = "labels-table": the per-patient labels table
    # (in a hospital folder: labels.csv or labels.parquet beside events)
    schema: str | None = None  # ehr-table / ehr-events: schema TOML
    cache_dir: str = "fedcare-cache"  # decoded-image cache
    image_size: int = 64
    multiframe: str = "first"
    require_deidentified: bool = True
    on_unreadable: str = "error"
    task: str = "classify"  # volumes: a label per series (classify) or a lesion mask per series (segment)


def dataset_task(dataset: str) -> str:
    """tabular | sequence | image: the kind of input a dataset's hospitals hold (the registry's)."""
    return dataset_spec(dataset).task


def hospital_folder(source: DataSource, dataset: str) -> Path:
    """The folder of a generated hospital: DATA_ROOT/hospital-<partition-id>."""
    if source.data_path:
        return Path(source.data_path)
    if source.data_root is None or source.partition_id is None:
        raise FedcareError(
            f"dataset '{dataset}' needs its hospital folders: no data-root/partition-id or data-path given",
            f"run `fedcare data prepare {dataset} DIR` and start the node with --node-config "
            "\"data-root='DIR' partition-id=N\" (or data-path='DIR/hospital-N')",
        )
    folder = Path(source.data_root) / f"hospital-{source.partition_id}"
    if not folder.is_dir():
        raise FedcareError(
            f"no hospital folder {folder}",
            f"run `fedcare data prepare {dataset} {source.data_root}` first, or check partition-id",
        )
    return folder


def hospital_name(dataset: str, source: DataSource) -> str:
    """The name ``load_hospital`` gives this hospital, without reading its data: the messages that
    only need to say who answers (key agreement, unmasking) do not parse a table or decode images."""
    if dataset == "fed-heart-disease":
        from client.datasets.fed_heart_disease import CENTERS

        if source.partition_id is None or not 0 <= source.partition_id < len(CENTERS):
            return load_hospital(dataset, source).name  # raises the error that says what to set
        return CENTERS[source.partition_id]
    if (
        dataset_task(dataset) in ("image", "volume")
        or dataset == "pbc2"
        or (dataset in ("ehr-table", "ehr-events") and not source.data_path)
    ):
        return hospital_folder(source, dataset).name
    return _own_files(dataset, source)[0].stem


def load_hospital(dataset: str, source: DataSource) -> HospitalData:
    """Load the local data this node trains and evaluates on."""
    task = dataset_task(dataset)
    if dataset == "fed-heart-disease":
        from client.datasets.fed_heart_disease import load_center

        if source.partition_id is None:
            raise FedcareError(
                "node config has no partition-id for the bundled dataset 'fed-heart-disease'",
                "start the node with --node-config 'partition-id=N' (0-based hospital index)",
            )
        return load_center(source.partition_id)
    if task == "volume":
        return _volume_hospital(hospital_folder(source, dataset), source)
    if task == "image":
        folder = hospital_folder(source, dataset)
        return _image_hospital(folder, Path(source.labels) if source.labels else folder / "labels.csv", source)
    if dataset == "pbc2" or (dataset in ("ehr-table", "ehr-events") and not source.data_path):
        # multi-site layout: DATA_ROOT/hospital-<i>/{table,events}.{csv,parquet} + schema.toml
        # (+ labels.{csv,parquet} when the events schema takes labels from a labels table)
        folder = hospital_folder(source, dataset)
        stem = "table" if dataset == "ehr-table" else "events"
        path = _data_file(folder, stem)
        if dataset == "ehr-table":
            return _table_hospital(path, folder / "schema.toml", folder.name)
        return _sequence_hospital(folder.name, path, folder / "schema.toml", _labels_file(folder), folder)
    path, schema = _own_files(dataset, source)
    if dataset == "ehr-table":
        return _table_hospital(path, schema, path.stem)
    return _sequence_hospital(path.stem, path, schema, Path(source.labels) if source.labels else None, None)


def _data_file(folder: Path, stem: str) -> Path:
    for suffix in (".csv", ".parquet"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FedcareError(
        f"hospital folder {folder} has no {stem}.csv or {stem}.parquet",
        f"put the hospital's {stem} file and schema.toml in {folder}",
    )


def _labels_file(folder: Path) -> Path | None:
    """A hospital folder's labels table (labels.csv, else labels.parquet), if it has one."""
    return next(
        (folder / f"labels{suffix}" for suffix in (".csv", ".parquet") if (folder / f"labels{suffix}").is_file()), None
    )


def _own_files(dataset: str, source: DataSource) -> tuple[Path, Path]:
    if not source.data_path or not source.schema:
        raise FedcareError(
            f"dataset '{dataset}' reads the hospital's own file: data-path or schema is not set",
            "start the node with --node-config \"data-path='/data/table.csv' schema='/data/schema.toml'\"",
        )
    return Path(source.data_path), Path(source.schema)


def _volume_hospital(folder: Path, source: DataSource) -> HospitalData:
    from client.datasets.volume_hospital import VolumePolicy, load_volume_hospital

    return load_volume_hospital(
        folder,
        Path(source.labels) if source.labels else folder / "labels.csv",
        VolumePolicy(),
        Path(source.cache_dir),
        require_deidentified=source.require_deidentified,
        on_unreadable=source.on_unreadable,
        task=source.task,
    )


def _image_hospital(folder: Path, labels: Path, source: DataSource) -> HospitalData:
    from sklearn.model_selection import train_test_split

    from client.datasets.dicom_folder import load_dicom_folder
    from client.datasets.dicom_reader import ImagePolicy

    policy = ImagePolicy(size=source.image_size, multiframe=source.multiframe)
    images = load_dicom_folder(
        folder,
        labels,
        policy,
        Path(source.cache_dir),
        require_deidentified=source.require_deidentified,
        on_unreadable=source.on_unreadable,
    )
    groups = np.asarray(images.groups)
    files = np.unique(groups)
    file_label = np.array([images.y[groups == g][0] for g in files])
    if len(files) < 2:
        raise FedcareError(
            f"hospital folder {folder} holds {len(files)} labelled image file(s)",
            "a hospital needs at least 2 labelled images (one to train, one to test)",
        )
    stratify = file_label if np.bincount(file_label, minlength=2).min() >= 2 else None
    train_files, _ = train_test_split(files, test_size=IMAGE_TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify)
    train = np.isin(groups, train_files)
    notes = list(images.notes)
    return HospitalData(
        name=folder.name,
        feature_names=[],
        numeric_features=[],
        feature_bounds={},
        x_train=images.x[train],
        y_train=images.y[train],
        x_test=images.x[~train],
        y_test=images.y[~train],
        task="image",
        notes=notes,
    )


def _table_hospital(path: Path, schema_path: Path, name: str) -> HospitalData:
    from client.datasets.ehr_schema import EhrSchema
    from client.datasets.ehr_table import load_ehr_table

    split = load_ehr_table(path, EhrSchema.from_file(schema_path), seed=SPLIT_SEED)
    return _from_split(name, split, "tabular")


def _sequence_hospital(
    name: str, events: Path, schema_path: Path, labels: Path | None, folder: Path | None
) -> HospitalData:
    """Events (+ the labels table the schema asks for) of a hospital folder, or of a node's own
    files (``folder`` None: the node config names them)."""
    from client.datasets.ehr_events import load_event_sequences
    from client.datasets.ehr_schema import EhrSchema

    schema = EhrSchema.from_file(schema_path)
    _check_labels_file(schema, labels, folder)
    split = load_event_sequences(events, schema, seed=SPLIT_SEED, labels_path=labels)
    return _from_split(name, split, "sequence")


def _check_labels_file(schema: EhrSchema, labels: Path | None, folder: Path | None) -> None:
    """A labels table is read exactly when the schema says label-source = "labels-table"; say which
    file to add or remove, where this hospital's data is described (its folder or its node config)."""
    if schema.events is None:
        return  # a [table] schema: the loader says so
    columns = f"columns '{schema.id}' and '{schema.label}', one row per patient"
    if schema.events.label_source == "labels-table" and labels is None:
        if folder is not None:
            raise FedcareError(
                f"hospital folder {folder} has no labels.csv or labels.parquet, but its schema "
                'takes labels from a labels table (label-source = "labels-table")',
                f"put the patients' labels ({columns}) in {folder / 'labels.csv'}",
            )
        raise FedcareError(
            f'{schema.source} takes labels from a labels table (label-source = "labels-table"), '
            "but the node config names no labels file",
            f'set labels = "/data/labels.csv" under [data] in hospital.toml (node config '
            f"labels='...'): a CSV or Parquet table with {columns}",
        )
    if schema.events.label_source == "events" and labels is not None:
        raise FedcareError(
            f"{labels} is a labels table, but {schema.source} takes the label from column "
            f"'{schema.label}' of the events (label-source = \"events\")",
            "remove the labels file (and the node config's labels), or set "
            'label-source = "labels-table" under [events] in the schema',
        )


def _from_split(name: str, split, task: str) -> HospitalData:
    return HospitalData(
        name=name,
        feature_names=list(split.feature_names),
        numeric_features=list(split.numeric_features),
        feature_bounds={k: tuple(v) for k, v in split.feature_bounds.items()},
        x_train=split.x_train,
        y_train=split.y_train,
        x_test=split.x_test,
        y_test=split.y_test,
        task=task,
        notes=split.report.notes(),
    )


def num_hospitals(dataset: str, data_root: str | None = None) -> int:
    """How many hospitals a bundled or generated dataset has."""
    spec = dataset_spec(dataset)
    if spec.hospitals is not None:
        return spec.hospitals
    if data_root and spec.hospital_folders:
        return len(sorted(Path(data_root).glob("hospital-*")))
    raise FedcareError(
        f"dataset '{dataset}' has no fixed hospital count",
        "give --data-root, a folder with one hospital-<i> folder per hospital",
    )


__all__ = ["DATASET_TASKS", "DataSource", "HospitalData", "dataset_task", "load_hospital", "num_hospitals"]
