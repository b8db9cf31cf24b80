"""3D segmentation's DP step on whole volumes against patch-based steps: peak memory and step time.

One DP-Adam step of the product's U-Net (``unet3d``) with the segmentation loss, 8 studies a batch,
clipped per study, as the hospitals train: on whole volumes, and on patches cut from the same
studies (``--patch-size``, ``--patches-per-study``), a study's patches clipped together as one
sample. Volume sizes grow from the default policy (32 x 32 x 20 voxels) to 8x and 27x as many
voxels; the patch plan stays the same, so its memory does not grow with the volume.

Each (size, mode) runs in a fresh process (glibc's mmap threshold lowered so freed tensors leave the
resident set at once): peak memory is the resident high-water mark a step adds above the state
kept between steps, plus that state (parameters, gradients, optimizer moments, the batch of whole
volumes the patches are cut from); step time is the median thread CPU time of five steps (one
torch thread, as in fedcare's simulation actors), cutting the patches included.

    .venv/bin/python bench/bench_patch_memory.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from bench.bench_dp_speed import _status_kib
from bench.markdown_report import replace_section
from client.dp_trainer import DPSettings, _make_private, _step, local_optimizer
from client.secret_randomness import SecretRandom
from client.volume_patches import cut_patches
from fedcare.run_config import PatchPlan
from shared_models.registry import build_model

HEADING = "### 3D segmentation: whole-volume and patch-based DP steps"
SIZES = ((32, 32, 20), (64, 64, 40), (96, 96, 60))
STUDIES = 8  # a batch: studies sampled for one step
PATCH = PatchPlan((16, 16, 12), 4)


def _studies(size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of studies: noise volumes, each with a cube-shaped lesion mask (1-2 % of its voxels)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(STUDIES, 1, *size, generator=g)
    masks = torch.zeros(STUDIES, 1, *size)
    side = [max(2, s // 5) for s in size]
    masks[:, :, : side[0], : side[1], : side[2]] = 1
    return x, masks


def measure(size: tuple[int, int, int], mode: str) -> dict[str, float]:
    """Peak MiB and median step seconds of DP-Adam steps on ``mode`` ('whole' or 'patches')."""
    torch.set_num_threads(1)
    patches = PATCH if mode == "patches" else None
    torch.manual_seed(0)
    model = build_model("unet3d", (1, *size), patch=patches.size if patches else None)
    x, masks = _studies(size)
    rng = SecretRandom.reproducible(0)
    dp = DPSettings(1.0, 0.1, sample_rate=0.25, steps_per_epoch=4)
    private = _make_private(model, local_optimizer("adam", model, 0.01, 0.0), x, masks, STUDIES, dp, rng, patches)

    def step() -> None:
        xb, yb = cut_patches(x, masks, patches, rng) if patches is not None else (x, masks)
        _step(model, private.optimizer, private, xb, yb, patches)

    for _ in range(2):
        step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
    base = _status_kib("VmRSS")
    times = []
    for _ in range(5):
        start = time.thread_time()
        step()
        times.append(time.thread_time() - start)
    transient = max(0, _status_kib("VmHWM") - base) / 1024
    params = sum(p.numel() for p in model.parameters())
    state = (params * 4 * 4 + (x.numel() + masks.numel()) * 4) / 2**20  # parameters, grads, 2 Adam moments
    private.clipper.close()
    return {"mib": transient + state, "seconds": statistics.median(times)}


def in_subprocess(size: tuple[int, int, int], mode: str) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, __file__, "--measure", "x".join(map(str, size)), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[tuple[tuple[int, int, int], dict, dict]]) -> str:
    patch = "x".join(map(str, PATCH.size))
    lines = [
        HEADING,
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()}, {platform.system()}, "
        f"{os.cpu_count()} CPU cores, one torch thread. Command:",
        "",
        "    .venv/bin/python bench/bench_patch_memory.py --write docs/benchmarks.md",
        "",
        f"One DP-Adam step of the U-Net (segmentation loss, clipped per study) on {STUDIES} studies: "
        f"whole volumes, or {PATCH.per_study} patches of {patch} voxels per study clipped together "
        "as one sample (`--patch-size "
        f"{patch} --patches-per-study {PATCH.per_study}`). Peak memory includes parameters, gradients, "
        "Adam's moments and the batch of whole volumes; step time includes cutting the patches.",
        "",
        "| volume (voxels) | whole: peak MiB | patches: peak MiB | memory patches / whole "
        "| whole: step s | patches: step s |",
        "|---|---|---|---|---|---|",
    ]
    for size, whole, patches in rows:
        lines.append(
            f"| {'x'.join(map(str, size))} | {whole['mib']:.0f} | {patches['mib']:.0f} | "
            f"{patches['mib'] / whole['mib']:.2f}x | {whole['seconds']:.3f} | {patches['seconds']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace this section of the given markdown page")
    parser.add_argument("--measure", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        size = tuple(int(v) for v in args.measure[0].split("x"))
        print(json.dumps(measure((size[0], size[1], size[2]), args.measure[1])))
        return
    rows = []
    for size in SIZES:
        whole, patches = in_subprocess(size, "whole"), in_subprocess(size, "patches")
        print(f"{size}: whole {whole}, patches {patches}", flush=True)
        rows.append((size, whole, patches))
    text = report(rows)
    print(text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()
