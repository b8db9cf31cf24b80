"""DICOM input path: decode throughput on the first epoch vs cached epochs, and the cached epoch's
split between loading and DP training.

Two sets, measured side by side in one run:
- the synthetic imaging hospitals (real DICOM written by simulation/synthetic_imaging.py);
- a mixed set of pydicom's real test files (CT, MR RLE, JPEG 2000, JPEG extended), made distinct
  by a fresh SOP Instance UID so the cache cannot share entries between copies.

    .venv/bin/python bench/bench_dicom_decode.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.markdown_report import replace_section
from client.datasets.dicom_folder import load_dicom_folder
from client.datasets.dicom_reader import ImagePolicy

HEADING = "### DICOM decode: first epoch and cached epochs"

REAL_FILES = ("CT_small.dcm", "MR_small_RLE.dcm", "693_J2KI.dcm", "JPGExtended.dcm")


def real_file_set(folder: Path, copies: int) -> Path:
    """``copies`` distinct files per real pydicom test file, with a labels.csv."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    images = folder / "images"
    images.mkdir(parents=True)
    rows = ["file,label"]
    for name in REAL_FILES:
        ds = pydicom.dcmread(get_testdata_file(name))
        for i in range(copies):
            ds.SOPInstanceUID = generate_uid()
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
                if keyword in ds:
                    delattr(ds, keyword)
            out = images / f"{Path(name).stem}-{i:03d}.dcm"
            ds.save_as(out)
            rows.append(f"images/{out.name},{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def timed_loads(folder: Path, cache: Path, policy: ImagePolicy, epochs: int) -> list[dict]:
    """Load the folder ``epochs`` times with one cache: epoch 1 decodes, later epochs hit the cache."""
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        images = load_dicom_folder(folder, folder / "labels.csv", policy, cache, require_deidentified=False)
        seconds = time.perf_counter() - t0
        out.append(
            {
                "n": len(images.y),
                "seconds": seconds,
                "hits": images.cache_hits,
                "misses": images.cache_misses,
                "x": images.x,
                "y": images.y,
            }
        )
    return out


def train_epoch_seconds(
    x: np.ndarray, y: np.ndarray, dp: bool, model: str = "cnn", batch_size: int = 32, warm_up: bool = False
) -> float:
    """One local epoch of ``model`` (DP-SGD through Opacus, or plain SGD); ``warm_up`` first runs one
    batch on a fresh copy, so the first calls' one-time costs (imports, allocator) are not counted."""
    from client.dp_trainer import DPSettings, train
    from client.secret_randomness import SecretRandom
    from shared_models.registry import build_model

    settings = DPSettings(1.0, 1.0) if dp else None
    if warm_up:
        warm = build_model(model, x.shape[1:])
        train(
            warm,
            x[:batch_size],
            y[:batch_size],
            epochs=1,
            batch_size=batch_size,
            lr=0.1,
            dp=settings,
            rng=SecretRandom.reproducible(1),
        )
    net = build_model(model, x.shape[1:])
    t0 = time.perf_counter()
    train(net, x, y, epochs=1, batch_size=batch_size, lr=0.1, dp=settings, rng=SecretRandom.reproducible(0))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-hospital", type=int, default=150)
    parser.add_argument("--real-copies", type=int, default=50, help="copies of each real pydicom test file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    policy = ImagePolicy(size=args.image_size)
    work = Path(tempfile.mkdtemp(prefix="fedcare-bench-dicom-"))
    try:
        from simulation.synthetic_imaging import write_hospitals

        t0 = time.perf_counter()
        hospitals = write_hospitals(work / "synthetic", n_hospitals=4, images_per_hospital=args.images_per_hospital)
        write_seconds = time.perf_counter() - t0
        sets = {f"synthetic {h.folder.name}": h.folder for h in hospitals}
        sets["pydicom real files (CT, RLE, J2K, JPEG ext.)"] = real_file_set(work / "real", args.real_copies)
        lines = []
        rows = []
        for label, folder in sets.items():
            loads = timed_loads(folder, work / "cache" / folder.name, policy, args.epochs)
            first, cached = loads[0], loads[1:]
            cached_s = float(np.mean([c["seconds"] for c in cached]))
            x, y = first["x"], first["y"]
            train_dp = train_epoch_seconds(x, y, dp=True)
            train_plain = train_epoch_seconds(x, y, dp=False)
            rows.append(
                (
                    label,
                    first["n"],
                    first["n"] / first["seconds"],
                    first["n"] / cached_s,
                    cached_s,
                    train_dp,
                    train_plain,
                    cached_s / (cached_s + train_dp),
                )
            )
            assert all(c["misses"] == 0 for c in cached), "a cached epoch decoded again"
        header = (
            "| set | images | epoch 1 decode (img/s) | cached epoch load (img/s) | cached load s | "
            "DP train epoch s | non-DP train epoch s | load share of a cached DP epoch |"
        )
        lines += [header, "|" + "---|" * 8]
        for label, n, cold, warm, warm_s, tdp, tplain, share in rows:
            lines.append(
                f"| {label} | {n} | {cold:.0f} | {warm:.0f} | {warm_s:.2f} | {tdp:.2f} | {tplain:.2f} | "
                f"{100 * share:.0f}% |"
            )
        total_n = sum(r[1] for r in rows)
        cold_all = total_n / sum(r[1] / r[2] for r in rows)
        warm_all = total_n / sum(r[4] for r in rows)
        text = "\n".join(
            [
                HEADING,
                "",
                f"Measured {date.today().isoformat()} on {platform.machine()} with {_cores()} cores, "
                f"image size {args.image_size}, CNN batch 32; {args.epochs} loads per set with one cache "
                "(epoch 1 decodes every file, later epochs read the cache).",
                "",
                "    .venv/bin/python bench/bench_dicom_decode.py --write docs/benchmarks.md",
                "",
                *lines,
                "",
                f"All sets: epoch 1 {cold_all:.0f} images/s, cached epochs {warm_all:.0f} images/s "
                f"({warm_all / cold_all:.1f}x). Writing the 4 synthetic hospitals "
                f"({sum(r[1] for r in rows[:4])} files) took {write_seconds:.1f} s.",
                "A cached load checks each file's size and modification time against the header index (a changed file is "
                "reread, re-hashed and re-checked for identifying attributes) and reads its decoded entry; the share column "
                "says how much of a cached DP epoch that is.",
            ]
        )
        print(text)
        if args.write:
            replace_section(args.write, HEADING, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
