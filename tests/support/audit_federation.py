"""A 3-hospital, 3-round DP federation's signed audit logs and ledgers, built with the real pieces.

``AuditLog`` per node and for the server, the hospitals' real ``PrivacyLedger`` (so
``epsilon_after`` is what the ledger computed), realistic Fed-Heart-Disease sizes, secure
aggregation roles. Shared by the audit verify and report tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audit.audit_log import (
    AuditLog,
    BudgetRecord,
    DPParams,
    RefusalRecord,
    ReleaseRecord,
    SecAggInfo,
    ServerRoundRecord,
    ServerRunRecord,
    UnmaskRecord,
    digest_arrays,
)
from audit.signing import load_or_create_key
from client.privacy_ledger import PrivacyLedger

RUN = "4242"
HOSPITALS = {"Cleveland": 199, "Hungary": 172, "Switzerland": 30}  # training sizes
NODE_IDS = {"Cleveland": 11, "Hungary": 12, "Switzerland": 13}
BATCH, DELTA, ROUNDS = 30, 1e-4, 3
# Noise multipliers of the order fedcare's run plans calibrate for epsilon ~1 on these sizes
# (fixed here: calibration is the privacy ledger's job and slow to repeat in every test).
TRAIN_SIGMA, STATS_SIGMA, MAX_GRAD_NORM = 2.5, 10.5, 1.0


@dataclass
class Federation:
    root: Path
    node_logs: dict[str, Path] = field(default_factory=dict)
    server_log: Path | None = None
    ledger_dir: Path | None = None
    final_epsilon: dict[str, float] = field(default_factory=dict)
    stats_sent: dict[str, str] = field(default_factory=dict)  # hospital -> digest of its paid statistics answer

    @property
    def logs(self) -> list[Path]:
        return [*self.node_logs.values(), self.server_log]


def build_federation(
    root: Path,
    *,
    claim: Callable[[str, int, float], float] = lambda h, r, e: e,
    skip_release: tuple[str, int] | None = None,
    hide_from_server: tuple[str, int] | None = None,
    run_id: str = RUN,
    reuse: Federation | None = None,
    sign_budget: bool = True,
    server_stops_after: int | None = None,
    resend_stats: Callable[[str], str] | None = None,
    first_round: int = 1,
    resumed_from: str | None = None,
) -> Federation:
    """A 3-hospital, 3-round DP run with secure aggregation; Switzerland refuses round 3.

    ``sign_budget``: each hospital signs its ledger's initial budget (as ``client/ledger_guard.py``
    does). ``server_stops_after``: the server crashes after logging that round (the hospitals
    have already released the next one). ``resend_stats`` (with ``reuse``): each hospital re-sends
    a statistics answer at no cost, given its paid answer's digest -> the digest it sends.
    ``first_round``/``resumed_from``: a run resumed from a checkpoint of run ``resumed_from``.
    """
    fed = reuse or Federation(root, ledger_dir=root / "ledgers", server_log=root / "server.jsonl")
    keys = root / "keys"
    server = AuditLog(fed.server_log, load_or_create_key(keys / "server.pem"), "server")
    nodes = {h: AuditLog(root / f"node-{h}.jsonl", load_or_create_key(keys / f"{h}.pem"), h) for h in HOSPITALS}
    fed.node_logs = {h: log.path for h, log in nodes.items()}
    rng = np.random.default_rng(7)
    model = {"net.0.weight": rng.normal(size=(8, 4)).astype(np.float32), "net.0.bias": np.zeros(8, np.float32)}
    for _ in range(first_round - 1):  # a resumed run starts from the checkpoint's model
        model = {k: v + 0.01 for k, v in model.items()}
    app = "a" * 64
    server.run(
        ServerRunRecord(
            run_id,
            {
                "resumed-from": resumed_from,
                "dp": True,
                "target-epsilon": 1.0,
                "delta": DELTA,
                "max-grad-norm": 1.0,
                "secure-aggregation": True,
                "secagg-threshold": 2,
                "strategy": "fedavg",
                "num-rounds": ROUNDS,
                "tls": True,
                "node-auth": True,
            },
            initial_model_digest=digest_arrays(model),
        )
    )
    ledgers, steps = {}, {}
    for h, n in HOSPITALS.items():
        fp = hashlib.sha256(h.encode()).hexdigest()
        ledgers[h] = PrivacyLedger.open(fed.ledger_dir, h, fp, budget=10.0, delta=DELTA)
        steps[h] = -(-n // BATCH)  # Poisson sampling: sample rate 1 / steps
        if reuse is None:
            sums = {"sum": rng.normal(size=5)}
            fed.stats_sent[h] = digest_arrays(sums)
            eps = ledgers[h].record(
                run_id, 0, "feature-stats", [(STATS_SIGMA, 1.0, 1)], stats_key="k", values={"sum": sums["sum"].tolist()}
            )
            nodes[h].release(
                ReleaseRecord(
                    run_id,
                    0,
                    "feature-stats",
                    app,
                    fp,
                    "",
                    digest_arrays(sums),
                    DPParams(STATS_SIGMA, 1.0, 1, None, DELTA),
                    claim(h, 0, eps),
                    SecAggInfo("plain"),
                )
            )
        elif resend_stats is not None:  # post-processing: the stored answer again, zero steps, not in the ledger
            nodes[h].release(
                ReleaseRecord(
                    run_id,
                    0,
                    "feature-stats",
                    app,
                    fp,
                    "",
                    resend_stats(fed.stats_sent[h]),
                    DPParams(STATS_SIGMA, 1.0, 0, None, DELTA),
                    ledgers[h].epsilon(),
                    SecAggInfo("plain"),
                )
            )
    for rnd in range(first_round, ROUNDS + 1):
        sampled = list(HOSPITALS)
        responded, refused = [], {}
        for h in sampled:
            if h == "Switzerland" and rnd == ROUNDS:
                reason = "Switzerland: budget 1.00 exhausted after round 2"
                nodes[h].refusal(RefusalRecord(run_id, rnd, reason, "budget"))
                refused[h] = reason
                continue
            entries = [(TRAIN_SIGMA, 1.0 / steps[h], steps[h])]
            eps = ledgers[h].record(
                run_id, rnd, "train", entries, noise_multiplier=TRAIN_SIGMA, max_grad_norm=MAX_GRAD_NORM
            )
            if skip_release != (h, rnd):
                masked = {"masked": rng.integers(0, 2**63, size=40, dtype=np.uint64)}
                nodes[h].release(
                    ReleaseRecord(
                        run_id,
                        rnd,
                        "train",
                        app,
                        hashlib.sha256(h.encode()).hexdigest(),
                        digest_arrays(model),
                        digest_arrays(masked),
                        DPParams.from_entries(entries, MAX_GRAD_NORM, DELTA),
                        claim(h, rnd, eps),
                        SecAggInfo("masked", sorted(NODE_IDS.values()), 2),
                    )
                )
            if hide_from_server != (h, rnd):
                responded.append(h)
        survivors = [NODE_IDS[h] for h in responded]
        for h in responded:
            nodes[h].unmask(UnmaskRecord(run_id, rnd, survivors, []))
        model = {k: v + 0.01 for k, v in model.items()}
        if server_stops_after is not None and rnd > server_stops_after:
            continue  # the coordinator's host died before it logged this round
        server.round(
            ServerRoundRecord(
                run_id,
                rnd,
                "fedavg",
                sampled,
                responded,
                {},
                refused,
                digest_arrays(model),
                {"threshold": 2, "survivors": survivors},
                "c" * 64,
            )
        )
    if reuse is None and sign_budget:
        # the ledgers' signed budget (a real node signs it first; last here, so the tests' line numbers hold)
        for h in HOSPITALS:
            nodes[h].budget(BudgetRecord(hashlib.sha256(h.encode()).hexdigest(), 10.0, None, "initial"))
    fed.final_epsilon = {h: ledgers[h].epsilon() for h in HOSPITALS}
    return fed
