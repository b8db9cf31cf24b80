"""Synthetic EHR tables for any number of simulated hospitals (scale runs).

The bundled real sets stop at a few hospitals: Fed-Heart-Disease has 4, and PBC2's 312 patients
leave too few per hospital beyond a handful. A scale run (10, 50, 100 hospitals) needs many
hospitals of the same size, so the per-hospital work stays constant and only the federation
grows. This writes an ``ehr-table`` multi-site layout (``hospital-<i>/table.csv`` + ``schema.toml``)
of synthetic patients: a logistic risk model over five vital/lab values and sex, with a
per-hospital case-mix shift. The rows go through exactly the loaders a real hospital's table
would; they carry no clinical meaning.

    fedcare data prepare synthetic-table DIR --hospitals 100
    fedcare simulate --dataset ehr-table --data-root DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcare.errors import FedcareError
from simulation.folder_lock import locked_folder, remove_previous

if TYPE_CHECKING:
    import pandas as pd

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic-table.json"
_MARKER_NAME = ".written-by-fedcare-synthetic-table"
DEFAULT_ROWS_PER_HOSPITAL = 100  # 70 train rows after the 30 % test split: above the default batch (30)
MIN_ROWS_PER_HOSPITAL = 10  # fewer leaves a test split of 2 or less
MAX_HOSPITALS = 4096  # secure aggregation's 2^64 ring sums at most this many nodes

# name -> (unit, public plausible range, population mean, sd, weight in the risk score)
NUMERIC = {
    "age": ("years", (18.0, 100.0), 58.0, 12.0, 0.9),
    "systolic_bp": ("mmHg", (60.0, 260.0), 132.0, 18.0, 0.6),
    "cholesterol": ("mg/dL", (50.0, 600.0), 210.0, 40.0, 0.4),
    "bmi": ("kg/m2", (10.0, 80.0), 27.5, 5.0, 0.3),
    "heart_rate": ("beats/min", (25.0, 220.0), 74.0, 12.0, -0.2),
}
MALE_WEIGHT = 0.5


def schema_text() -> str:
    """The federation's shared schema (no patient data: public ranges only)."""
    lines = [
        "# fedcare synthetic-table: generated patients for scale runs (no clinical meaning)",
        "",
        "[table]",
        'id = "patient_id"',
        'label = "event"',
        "test-fraction = 0.3",
        "",
    ]
    for name, (unit, (lo, hi), *_rest) in NUMERIC.items():
        lines += [f"[numeric.{name}]", f'unit = "{unit}"', f"range = [{lo}, {hi}]", ""]
    lines += ["[categorical.sex]", 'levels = ["F", "M"]', ""]
    return "\n".join(lines)


def hospital_rows(index: int, rows: int, seed: int) -> pd.DataFrame:
    """One hospital's patients; its case mix (mean shifts, baseline risk) depends on ``index``."""
    import pandas as pd

    rng = np.random.default_rng([seed, index])
    shift = rng.normal(0.0, 0.4, size=len(NUMERIC))  # case mix, in population sds
    baseline = rng.normal(-0.3, 0.3)  # hospital's baseline log-odds
    columns, score = {}, np.full(rows, baseline)
    for (name, (_unit, (lo, hi), mean, sd, weight)), s in zip(NUMERIC.items(), shift):
        z = rng.normal(s, 1.0, size=rows)
        columns[name] = np.round(np.clip(mean + sd * z, lo, hi), 1)
        score += weight * z
    male = rng.random(rows) < 0.5
    score += MALE_WEIGHT * male
    event = (rng.random(rows) < 1.0 / (1.0 + np.exp(-score))).astype(int)
    ids = [f"h{index}-p{i:05d}" for i in range(rows)]
    return pd.DataFrame({"patient_id": ids, **columns, "sex": np.where(male, "M", "F"), "event": event})


def write_table_hospitals(
    root: Path, n_hospitals: int, rows_per_hospital: int = DEFAULT_ROWS_PER_HOSPITAL, seed: int = 0
) -> list[Path]:
    """Write (or reuse) ``root/hospital-<i>`` (table.csv + schema.toml) for ``n_hospitals`` hospitals.

    Folders a previous call wrote with other settings are replaced; anything else named
    ``hospital-*`` under ``root`` is left alone and the call refuses, so a real site's data is
    never overwritten.
    """
    if isinstance(n_hospitals, bool) or not isinstance(n_hospitals, int) or not 1 <= n_hospitals <= MAX_HOSPITALS:
        raise FedcareError(
            f"synthetic-table supports 1 to {MAX_HOSPITALS} hospitals, got {n_hospitals!r}",
            f"pass --hospitals between 1 and {MAX_HOSPITALS}",
        )
    if rows_per_hospital < MIN_ROWS_PER_HOSPITAL:
        raise FedcareError(f"rows per hospital must be >= {MIN_ROWS_PER_HOSPITAL}, got {rows_per_hospital}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = {"n_hospitals": n_hospitals, "rows_per_hospital": rows_per_hospital, "seed": seed}
    folders = [root / f"hospital-{i}" for i in range(n_hospitals)]
    with locked_folder(root):
        manifest = root / MANIFEST_NAME
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if (
            old == {"version": GENERATOR_VERSION, "params": params}
            and sorted(root.glob("hospital-*")) == sorted(folders)
            and all((f / "table.csv").is_file() for f in folders)
        ):
            return folders
        remove_previous(root, _MARKER_NAME, "synthetic-table")
        manifest.unlink(missing_ok=True)
        schema = schema_text()
        for index, folder in enumerate(folders):
            folder.mkdir()
            hospital_rows(index, rows_per_hospital, seed).to_csv(folder / "table.csv", index=False)
            (folder / "schema.toml").write_text(schema)
            (folder / _MARKER_NAME).write_text("written by fedcare simulation.synthetic_table\n")
        manifest.write_text(json.dumps({"version": GENERATOR_VERSION, "params": params}))
    return folders
