"""The coordinator's per-round checkpoint, so a crashed run resumes from its last completed round.

Holds the global model, the Flower strategy's optimiser state (FedAdam's moments), the agreed
normalisation, the per-round history, and the id of the run whose privacy plan the hospitals
follow: a resumed run asks the nodes to keep that plan (same noise multiplier), so their ledgers
do not restart the budget; a round they were charged for before the crash but that was never
checkpointed is asked again, and each hospital re-plans the rest of the run to fit (what that cost
is kept here too, ``crash_cost``). Written atomically after every round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord

from fedcare.errors import FedcareError

CHECKPOINT_DIR = "checkpoint"
STATE = "state.json"
ARRAYS = "arrays.npz"
VERSION = 1
STRATEGY_STATE = ("m_t", "v_t")  # FedOpt family (FedAdam): first and second moments
# Settings a resumed run may change without changing what it computes.
RESUMABLE_CHANGES = ("resume", "output_dir", "ledger_dir", "data_root")


@dataclass
class Checkpoint:
    completed_round: int
    plan_run_id: str
    settings: dict[str, Any]
    normalisation: dict[str, Any]
    rounds: list[dict[str, Any]]
    arrays: ArrayRecord
    strategy_state: dict[str, dict[str, np.ndarray]]
    crash_cost: dict[str, Any] = dataclasses.field(default_factory=dict)  # what earlier crashes cost (see run_report)


def save_checkpoint(out_dir: str | Path, ckpt: Checkpoint) -> None:
    """Write the checkpoint folder atomically (a crash mid-write leaves the previous one intact)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-"))
    arrays = {f"model/{k}": v.numpy() for k, v in ckpt.arrays.items()}
    for name, values in ckpt.strategy_state.items():
        arrays |= {f"{name}/{k}": v for k, v in values.items()}
    np.savez(tmp / ARRAYS, **arrays)  # type: ignore[arg-type]  # numpy's stub: **arrays is also matched against allow_pickle: bool
    state = {
        "version": VERSION,
        "completed_round": ckpt.completed_round,
        "plan_run_id": ckpt.plan_run_id,
        "settings": ckpt.settings,
        "normalisation": ckpt.normalisation,
        "rounds": ckpt.rounds,
        "crash_cost": ckpt.crash_cost,
    }
    (tmp / STATE).write_text(json.dumps(state, indent=1, default=_jsonable))
    final = out / CHECKPOINT_DIR
    old = out / ".checkpoint-old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def checkpoint_digest(out_dir: str | Path) -> str:
    """SHA-256 over the checkpoint's files, for the coordinator's audit log."""
    h = hashlib.sha256()
    for name in (STATE, ARRAYS):
        h.update((Path(out_dir) / CHECKPOINT_DIR / name).read_bytes())
    return h.hexdigest()


def load_checkpoint(out_dir: str | Path) -> Checkpoint:
    """The last completed round's checkpoint; a clear error when there is none."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not (folder / STATE).is_file():
        old = Path(out_dir) / ".checkpoint-old"
        if (old / STATE).is_file():
            folder = old  # the crash hit between the two renames
        else:
            raise FedcareError(
                f"no checkpoint to resume in {folder}",
                "resume with the output-dir of the run that stopped, or start without resume",
            )
    state = json.loads((folder / STATE).read_text())
    if state.get("version") != VERSION:
        raise FedcareError(
            f"checkpoint {folder} has format {state.get('version')}, expected {VERSION}",
            "start a new run (the old one was written by another fedcare version)",
        )
    model: dict[str, Any] = {}
    strategy_state: dict[str, Any] = {}
    with np.load(folder / ARRAYS) as saved:
        for key in saved.files:
            group, name = key.split("/", 1)
            if group == "model":
                model[name] = Array(saved[key])
            else:
                strategy_state.setdefault(group, {})[name] = saved[key]
    return Checkpoint(
        state["completed_round"],
        state["plan_run_id"],
        state["settings"],
        state["normalisation"],
        state["rounds"],
        ArrayRecord(model),
        strategy_state,
        state.get("crash_cost", {}),
    )


def check_compatible(ckpt: Checkpoint, settings: dict[str, Any]) -> None:
    """Refuse to resume with settings that would change the computation (model, data, privacy...)."""
    ignore = {k.replace("_", "-") for k in RESUMABLE_CHANGES}
    changed = sorted(
        k for k in set(ckpt.settings) | set(settings) if k not in ignore and ckpt.settings.get(k) != settings.get(k)
    )
    if changed:
        raise FedcareError(
            f"cannot resume: these settings differ from the checkpointed run: {', '.join(changed)}",
            "resume with the same run config (only output-dir, ledger-dir and data-root may move)",
        )


def strategy_state(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's optimiser state worth carrying over (empty for FedAvg/FedProx)."""
    state = {}
    for name in STRATEGY_STATE:
        value = getattr(strategy, name, None)
        if isinstance(value, dict) and value:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def restore_strategy(strategy: Any, state: dict[str, dict[str, np.ndarray]]) -> None:
    for name, values in state.items():
        setattr(strategy, name, dict(values))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(cast(Any, value))  # an instance: _jsonable is given values, never classes
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
