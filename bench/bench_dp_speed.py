"""DP-SGD step time and peak memory against a plain step, per model family, side by side in one run.

For each family (logistic and MLP on tables, the GroupNorm CNN on images, MONAI's 3D DenseNet and
U-Net on CT volumes, the masked GRU on event sequences) one step of the same architecture on the same batch is timed in four ways:

- ``plain``: non-DP SGD (for sequences: PyTorch's fused ``nn.GRU``, the issue's baseline; the
  fedcare GRU without DP is shown too),
- ``fedcare``: the DP-SGD step fedcare trains with (``client/per_sample_clipping.py`` for the clipped
  sum in one backward pass, Opacus's optimizer for the noise, averaging and accountant step),
- ``opacus hooks`` and ``opacus ghost``: Opacus 1.6's own per-sample gradient modes.

Modes are interleaved (every repetition times each mode in turn, taking the median step of that
turn) and each mode's cost is its least-disturbed repetition, so load from other processes hits
all modes alike and is filtered out; with one torch thread (the default, as in fedcare's
simulation actors) a step is timed by the CPU time of the thread that runs it. Peak memory is
measured per (case, mode) in a fresh process: the peak resident memory a step adds above the state
kept between steps, plus that state (parameters, gradients, the batch), with glibc's mmap threshold
lowered so freed tensors leave the resident set at once.

With ``--device cuda`` the same cases run on the GPU: each step is timed by the wall clock between
two ``torch.cuda.synchronize()`` calls, and peak memory is the CUDA allocator's peak of allocated
bytes over a few steps built from nothing (model, gradients, batch and the step's temporaries).
Those results go into their own section.

    .venv/bin/python bench/bench_dp_speed.py --write docs/benchmarks.md
    python bench/bench_dp_speed.py --device cuda --write docs/benchmarks.md   # where a GPU is
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from torch import nn

from bench.markdown_report import replace_section
from client.dp_optimizer import ClippedSumDPOptimizer
from client.per_sample_clipping import PerSampleClipper
from client.secret_randomness import SecretRandom
from shared_models.registry import build_model

HEADING = "### DP-SGD step time and memory against plain SGD on a CPU"
GPU_HEADING = "### DP-SGD step time and memory against plain SGD on a GPU"
DEVICE = torch.device("cpu")  # set once by main(); every model and batch is placed on it
MODES = ("plain", "fedcare", "fedcare hardened", "fedcare torch noise", "opacus hooks", "opacus ghost")


class TorchGeneratorNoise:
    """Noise from torch's default generator: what fedcare drew before secret randomness (NOT private:
    a seed reproduces it). Here only to measure what the secret stream costs, side by side."""

    def add_gaussian_(self, target: torch.Tensor, std: float) -> None:
        target.add_(torch.normal(0.0, std, size=target.shape, device=target.device, dtype=target.dtype))

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, size=reference.shape, device=reference.device, dtype=reference.dtype)


class PlainGRU(nn.Module):
    """The issue's baseline: PyTorch's fused nn.GRU (no mask gate) and the same linear head."""

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x[..., :-1])
        return self.head(h[-1]).squeeze(-1)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    model: Callable[[], nn.Module]
    batch: Callable[[int], torch.Tensor]
    batch_size: int
    bar: float
    plain_model: Callable[[], nn.Module] | None = None  # baseline architecture when it differs


class VoxelMean(nn.Module):
    """A segmentation network reduced to one logit per volume (the mean over voxels), so its DP step
    is timed with the same per-sample loss as the other cases: the backward pass still runs through
    every voxel's output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3, 4))


def _unet3d() -> nn.Module:
    return VoxelMean(build_model("unet3d", (1, 32, 32, 20)))


def _sequences(steps: int, features: int) -> Callable[[int], torch.Tensor]:
    def make(n: int) -> torch.Tensor:
        x = torch.randn(n, steps, features + 1)
        lengths = torch.randint(1, steps + 1, (n,))
        x[..., -1] = (torch.arange(steps)[None, :] >= steps - lengths[:, None]).float()
        x[..., :-1] *= x[..., -1:]
        return x

    return make


CASES = [
    Case(
        "logistic, 13 features, batch 30 (Fed-Heart-Disease preset)",
        "tabular",
        lambda: build_model("logistic", 13),
        lambda n: torch.randn(n, 13),
        30,
        1.5,
    ),
    Case(
        "MLP 30-32-32-1, batch 30 (ehr-table default)",
        "tabular",
        lambda: build_model("mlp", 30, 32),
        lambda n: torch.randn(n, 30),
        30,
        1.5,
    ),
    Case(
        "MLP 30-256-256-1, batch 256",
        "tabular",
        lambda: build_model("mlp", 30, 256),
        lambda n: torch.randn(n, 30),
        256,
        1.5,
    ),
    Case(
        "CNN 1x64x64, batch 32 (synthetic-imaging preset)",
        "image",
        lambda: build_model("cnn", (1, 64, 64)),
        lambda n: torch.randn(n, 1, 64, 64),
        32,
        1.8,
    ),
    Case(
        "3D CNN (MONAI convolution blocks, GroupNorm) 1x32x32x20, batch 16 (synthetic-ct preset)",
        "volume",
        lambda: build_model("cnn3d", (1, 32, 32, 20)),
        lambda n: torch.rand(n, 1, 32, 32, 20),
        16,
        1.8,
    ),
    Case(
        "3D DenseNet (MONAI, GroupNorm) 1x32x32x20, batch 8",
        "volume",
        lambda: build_model("densenet3d", (1, 32, 32, 20)),
        lambda n: torch.rand(n, 1, 32, 32, 20),
        8,
        1.8,
    ),
    Case(
        "3D U-Net (MONAI, instance norm, residual units) 1x32x32x20, batch 16 (synthetic-ct segment preset)",
        "volume",
        _unet3d,
        lambda n: torch.rand(n, 1, 32, 32, 20),
        16,
        2.0,
    ),
    Case(
        "GRU h32, 5 steps x 18 features, batch 16 (PBC2 preset)",
        "sequence",
        lambda: build_model("gru", (5, 19)),
        _sequences(5, 18),
        16,
        2.5,
        lambda: PlainGRU(18),
    ),
    Case(
        "GRU h32, 30 steps x 18 features, batch 64",
        "sequence",
        lambda: build_model("gru", (30, 19)),
        _sequences(30, 18),
        64,
        2.5,
        lambda: PlainGRU(18),
    ),
]


def make_step(case: Case, mode: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step of ``mode`` on (x, y), built the way fedcare or Opacus builds it."""
    torch.manual_seed(0)
    if mode in ("plain", "fedcare (no DP)"):
        model = ((case.plain_model or case.model)() if mode == "plain" else case.model()).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def plain() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()

        return plain
    model = case.model().to(DEVICE)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    common = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(y))
    if mode in ("fedcare", "fedcare hardened", "fedcare torch noise"):
        from opacus.accountants import RDPAccountant

        # the hospital's secret noise (OS entropy); "hardened": the four-draw float64 mitigation
        noise = TorchGeneratorNoise() if mode == "fedcare torch noise" else SecretRandom(hardened=mode != "fedcare")
        opt = ClippedSumDPOptimizer(sgd, loss_reduction="mean", noise=noise, **common)
        opt.attach_step_hook(RDPAccountant().get_optimizer_hook_fn(sample_rate=0.1))
        clipper = PerSampleClipper(model, 1.0)

        def fedcare() -> None:
            opt.zero_grad(set_to_none=True)
            with clipper.recording():
                loss = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
            clipper.clip_and_sum(loss, len(y))
            opt.step()

        return fedcare
    if mode == "opacus hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model)
        opt = DPOptimizer(sgd, **common)

        def hooks() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.binary_cross_entropy_with_logits(gsm(x), y).backward()
            opt.step()

        return hooks
    if mode == "opacus ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(sgd, **common)
        criterion = DPLossFastGradientClipping(gsm, opt, nn.BCEWithLogitsLoss(), "mean")

        def ghost() -> None:
            opt.zero_grad(set_to_none=True)
            criterion(gsm(x), y).backward()
            opt.step()

        return ghost
    raise ValueError(mode)


def _data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return case.batch(case.batch_size).to(DEVICE), (torch.rand(case.batch_size) > 0.5).float().to(DEVICE)


def time_case(
    case: Case, modes: list[str], reps: int, budget_s: float, clock: Callable[[], float] = time.perf_counter
) -> dict[str, dict[str, float]]:
    """Median step time per mode and median per-repetition ratio to ``plain``."""
    x, y = _data(case)
    steps: dict[str, Callable[[], None]] = {}
    for mode in modes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = make_step(case, mode, x, y)
                step()
            steps[mode] = step
        except Exception as exc:  # an Opacus mode that cannot run this model: reported, not fatal
            print(f"  {mode}: not available ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
    first = time.perf_counter()
    steps["plain"]()
    n = max(5, int(budget_s / max(time.perf_counter() - first, 1e-5) / len(steps)))
    times: dict[str, list[float]] = {m: [] for m in steps}
    ratios: dict[str, list[float]] = {m: [] for m in steps}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            medians = {}
            for mode, step in steps.items():
                for _ in range(2):
                    step()
                samples = []
                for _ in range(n):
                    start = clock()
                    step()
                    samples.append(clock() - start)
                medians[mode] = statistics.median(samples)
                times[mode].append(medians[mode])
            for mode in steps:
                ratios[mode].append(medians[mode] / medians["plain"])
    # The least-disturbed repetition of each mode is its cost; the ratios of those are reported
    # (the median of per-repetition ratios is kept to show how much the load moved them).
    best = {m: min(times[m]) for m in steps}
    return {
        m: {
            "ms": 1e3 * best[m],
            "ratio": best[m] / best["plain"],
            "median_ratio": statistics.median(ratios[m]),
            "reps": times[m],
        }
        for m in steps
    }


def measure_memory(case_index: int, mode: str) -> float:
    """Peak MiB of one step: what it adds above the between-step state, plus that state."""
    case = CASES[case_index]
    x, y = _data(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = make_step(case, mode, x, y)
        for _ in range(3):
            step()
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
        base = _status_kib("VmRSS")
        for _ in range(5):
            step()
    transient = max(0, _status_kib("VmHWM") - base) / 1024
    model_bytes = sum(p.numel() * p.element_size() for p in _models_in(step)) * 2  # parameters + grads
    return transient + (model_bytes + x.numel() * x.element_size()) / 2**20


def _models_in(step: Callable[[], None]) -> list[torch.Tensor]:
    """The parameters a step closure trains (found through its optimizer)."""
    for cell in step.__closure__ or ():
        value = cell.cell_contents
        if isinstance(value, torch.optim.Optimizer):
            return [p for g in value.param_groups for p in g["params"]]
        inner = getattr(value, "original_optimizer", None)
        if inner is not None:
            return [p for g in inner.param_groups for p in g["params"]]
    return []


def _clock(threads: int) -> Callable[[], float]:
    """With one torch thread all of a step runs on the calling thread: its CPU time is the step
    time on an idle core, and other processes sharing the machine do not inflate it. On a GPU the
    kernels run asynchronously, so a step is the wall time between two synchronisations."""
    if DEVICE.type == "cuda":

        def synchronized() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return synchronized
    return time.thread_time if threads == 1 else time.perf_counter


def measure_cuda_memory(case: Case, mode: str) -> float:
    """Peak MiB the CUDA allocator hands out while ``mode`` is built and steps five times."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = _data(case)
        step = make_step(case, mode, x, y)
        for _ in range(5):
            step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del step, x, y
    gc.collect()
    return peak / 2**20


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_in_subprocess(case_index: int, mode: str) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(
        [sys.executable, __file__, "--memory-of", str(case_index), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.4, help="seconds of steps per mode and repetition")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fedcare's simulation actors use 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--write", type=Path, help="write the results into this markdown file")
    parser.add_argument("--memory-of", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch on this machine")
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"mib": measure_memory(int(args.memory_of[0]), args.memory_of[1])}))
        return
    chosen = [int(i) for i in args.cases.split(",")] if args.cases else list(range(len(CASES)))
    rows = []
    for index in chosen:
        case = CASES[index]
        modes = list(MODES) + (["fedcare (no DP)"] if case.plain_model else [])
        print(f"{case.name}", flush=True)
        timing = time_case(case, modes, args.reps, args.budget, _clock(args.threads))
        memory = {}
        if not args.no_memory:
            for mode in ("plain", "fedcare") + (("fedcare (no DP)",) if case.plain_model else ()):
                memory[mode] = (
                    measure_cuda_memory(case, mode) if DEVICE.type == "cuda" else memory_in_subprocess(index, mode)
                )
        rows.append((case, timing, memory))
        for mode, t in timing.items():
            print(
                f"  {mode:16s} {t['ms']:9.3f} ms  {t['ratio']:6.2f}x  (median per-repetition ratio "
                f"{t['median_ratio']:.2f}x)",
                flush=True,
            )
        if memory:
            print(f"  peak memory: {_memory_cell(memory)}", flush=True)
    text = report(rows, args)
    print("\n" + text)
    if args.write:
        replace_section(args.write, GPU_HEADING if DEVICE.type == "cuda" else HEADING, text)


RESOLVABLE_MIB = 0.5  # below this, resident-set differences are allocator noise


def _memory_cell(memory: dict[str, float | None]) -> str:
    plain, dp = memory.get("plain"), memory.get("fedcare")
    if plain is None or dp is None:
        return "measurement failed"
    if max(plain, dp) < RESOLVABLE_MIB:
        return f"both < {RESOLVABLE_MIB} MiB (too small to compare)"
    text = f"{plain:.1f} / {dp:.1f} MiB ({dp / plain:.2f}x)"
    own = memory.get("fedcare (no DP)")
    if own is not None:
        text += f"; fedcare GRU without DP {own:.1f} MiB ({dp / own:.2f}x)"
    return text


def report(rows: list, args: argparse.Namespace) -> str:
    def cell(timing: dict, mode: str) -> str:
        t = timing.get(mode)
        return "n/a" if t is None else f"{t['ms']:.2f} ms ({t['ratio']:.2f}x)"

    write = " --write docs/benchmarks.md" if args.write else ""
    if DEVICE.type == "cuda":
        command = f"python bench/bench_dp_speed.py --device cuda{write}"
        where = (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, best of {args.reps} interleaved "
            "repetitions; wall-clock time per step between two CUDA synchronisations; peak memory is the "
            "CUDA allocator's peak of allocated bytes over five steps, model and batch included"
        )
    else:
        command = f".venv/bin/python bench/bench_dp_speed.py{write}"
        where = (
            f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{args.threads} torch thread(s), best of {args.reps} interleaved repetitions; "
            f"{'CPU time of the training thread' if args.threads == 1 else 'wall-clock time'} per step"
        )
    lines = [
        GPU_HEADING if DEVICE.type == "cuda" else HEADING,
        "",
        f"`{command}` ({date.today()}, {where}). "
        "Step = zero_grad, forward, loss, backward (and clipping), optimizer step, noise multiplier 1, "
        "clip norm 1. fedcare's noise and batches come from the hospital's secret stream (AES-256-CTR keyed "
        'from OS entropy); "hardened noise" is the policy option `hardened-noise = true` (Opacus\'s '
        'secure-mode Gaussian: four float64 draws per value); "torch noise" is the same step with its noise from '
        "torch's default generator (not private; shown to price the secret stream), so the secret stream's cost is "
        "the ratio of the two fedcare columns (best of, and median of the per-repetition ratios). Ratios are to the plain step of the same "
        "architecture on the same batch; for the GRU, plain is PyTorch's fused `nn.GRU`. The last column shows "
        "the median of the per-repetition fedcare ratios, i.e. how much the machine's load moved them.",
        "",
        "| case | plain | fedcare DP | fedcare DP, hardened noise | fedcare DP, torch noise | secret stream cost "
        "| Opacus hooks | Opacus ghost | bar | met | peak memory plain / DP (ratio) | fedcare median ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, timing, memory in rows:
        ratio = timing["fedcare"]["ratio"]
        mem = _memory_cell(memory) if memory else "not measured"
        plain = f"{timing['plain']['ms']:.2f} ms"
        if "fedcare (no DP)" in timing:
            plain += f" (fedcare GRU without DP: {timing['fedcare (no DP)']['ms']:.2f} ms)"
        secret, torch_noise = timing["fedcare"], timing["fedcare torch noise"]
        cost = (
            f"{secret['ms'] / torch_noise['ms']:.2f}x (median "
            f"{statistics.median(a / b for a, b in zip(secret['reps'], torch_noise['reps'])):.2f}x)"
        )
        lines.append(
            f"| {case.name} | {plain} | {cell(timing, 'fedcare')} | {cell(timing, 'fedcare hardened')} | "
            f"{cell(timing, 'fedcare torch noise')} | {cost} | {cell(timing, 'opacus hooks')} | "
            f"{cell(timing, 'opacus ghost')} | <= {case.bar}x | {'yes' if ratio <= case.bar else '**no**'} | "
            f"{mem} | {timing['fedcare']['median_ratio']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
