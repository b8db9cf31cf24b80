"""The datasets fedcare knows: one entry each, the only place dataset facts are kept.

Everything else derives from here: which model family a dataset trains (run settings check the
model against it), its run-setting presets (``fedcare simulate`` applies them), the ``[data]``
keys a hospital's ``hospital.toml`` needs for it (``fedcare node``), whether ``fedcare simulate``
writes its hospitals itself, and how many hospitals a bundled dataset has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fedcare.errors import FedcareError

TASKS = ("tabular", "sequence", "image", "volume")
# What a run learns from the data: a 0/1 label per patient (classify, every kind of data), or a lesion
# mask per volume (segment: volume data whose series have segmentation objects).
LEARNING_TASKS = ("classify", "segment")
SEGMENTABLE = frozenset({"volume"})
# 3D segmentation (the U-Net), measured on synthetic-ct (docs/benchmarks.md): plain SGD leaves it
# predicting one fixed blob; DP-Adam at this rate, with more local steps a round, learns the lesions.
# Its per-study gradients are small (median norm 0.03-0.3 while it learns): clipping at 0.1 keeps the
# noise, which scales with the clipping norm, near the signal instead of 10x above it.
_SEGMENT_PRESET = {"local_optimizer": "adam", "learning_rate": 0.01, "local_epochs": 4, "max_grad_norm": 0.1}
# [data] keys every DICOM source takes (the de-identification guard and unreadable-file handling)
_DICOM_KEYS = frozenset({"multiframe", "require-deidentified", "on-unreadable"})


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: what its hospitals hold and how a node and a simulation find it."""

    name: str
    task: str  # tabular | sequence | image | volume: which models can train on it
    summary: str  # one line for help texts
    required_keys: frozenset[str]  # hospital.toml [data] keys a node must set for it
    optional_keys: frozenset[str] = frozenset()
    preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # run settings fedcare simulate applies
    segment_preset: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # ...over those, for task=segment
    generated: bool = False  # `fedcare data prepare` / `fedcare simulate` write its hospital folders
    hospitals: int | None = None  # a bundled dataset's fixed hospital count
    hospital_folders: bool = False  # a simulation reads DATA_ROOT/hospital-<i> folders (own or generated)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"dataset {self.name}: unknown task {self.task!r}")
        object.__setattr__(self, "preset", MappingProxyType(dict(self.preset)))
        object.__setattr__(self, "segment_preset", MappingProxyType(dict(self.segment_preset)))

    def preset_for(self, task: str) -> dict[str, Any]:
        """The run settings ``fedcare simulate`` starts from for ``task`` (classify or segment)."""
        return dict(self.preset) | (dict(self.segment_preset) if task == "segment" else {})


REGISTRY: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            DatasetSpec(
                "fed-heart-disease",
                "tabular",
                "bundled: 4 real hospitals (Cleveland, Hungary, Switzerland, VA Long Beach)",
                frozenset({"partition-id"}),
                hospitals=4,
            ),
            DatasetSpec(
                "pbc2",
                "sequence",
                "real PBC2 lab sequences split across generated hospitals (`fedcare data prepare pbc2 DIR`)",
                frozenset({"data-root", "partition-id"}),
                preset={
                    "num_rounds": 15,
                    "batch_size": 16,
                    "learning_rate": 0.2,
                    "target_epsilon": 3.0,
                    "hospitals": 3,
                },
                generated=True,
                hospital_folders=True,
            ),
            DatasetSpec(
                "synthetic-imaging",
                "image",
                "generated DICOM hospitals (`fedcare data prepare synthetic-imaging DIR`)",
                frozenset({"data-root", "partition-id"}),
                _DICOM_KEYS,
                preset={
                    "num_rounds": 15,
                    "local_epochs": 3,
                    "batch_size": 32,
                    "learning_rate": 0.2,
                    "target_epsilon": 8.0,
                    "hospitals": 4,
                },
                generated=True,
                hospital_folders=True,
            ),
            DatasetSpec(
                "synthetic-ct",
                "volume",
                "generated CT hospitals: DICOM series with SEG lesion masks (`fedcare data prepare synthetic-ct DIR`)",
                frozenset({"data-root", "partition-id"}),
                frozenset({"require-deidentified", "on-unreadable"}),
                preset={
                    "num_rounds": 10,
                    "local_epochs": 2,
                    "batch_size": 16,
                    "learning_rate": 0.1,
                    "target_epsilon": 8.0,
                    "hospitals": 4,
                },
                segment_preset=_SEGMENT_PRESET,
                generated=True,
                hospital_folders=True,
            ),
            DatasetSpec(
                "dicom-series",
                "volume",
                "a hospital's own CT/MR series folder + labels.csv (StudyInstanceUID,label)",
                frozenset({"data-path"}),
                frozenset({"labels", "require-deidentified", "on-unreadable"}),
                preset={"local_epochs": 2, "batch_size": 16, "learning_rate": 0.1},
                segment_preset=_SEGMENT_PRESET,
            ),
            DatasetSpec(
                "ehr-table",
                "tabular",
                "a hospital's own CSV/Parquet table + schema",
                frozenset({"data-path", "schema"}),
                hospital_folders=True,
            ),
            DatasetSpec(
                "ehr-events",
                "sequence",
                "a hospital's own events table + schema",
                frozenset({"data-path", "schema"}),
                frozenset({"labels"}),
                preset={"batch_size": 16, "learning_rate": 0.2},
                hospital_folders=True,
            ),
            DatasetSpec(
                "dicom",
                "image",
                "a hospital's own DICOM folder + labels.csv",
                frozenset({"data-path"}),
                _DICOM_KEYS | {"labels"},
                preset={"local_epochs": 3, "batch_size": 32, "learning_rate": 0.2},
            ),
        )
    }
)
DATASET_NAMES: tuple[str, ...] = tuple(REGISTRY)
GENERATED: tuple[str, ...] = tuple(name for name, spec in REGISTRY.items() if spec.generated)


def model_input_kind(data_kind: str, task: str) -> str:
    """What the model is built for: the data's kind, or "segmentation" for volumes segmented voxel by voxel."""
    return "segmentation" if task == "segment" and data_kind in SEGMENTABLE else data_kind


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; an unknown name is refused with the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise FedcareError(f"unknown dataset '{name}'", f"choose one of: {', '.join(DATASET_NAMES)}") from None
