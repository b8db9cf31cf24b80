"""An ethics-board datasheet from verified audit logs: Markdown plus an epsilon plot (PNG).

Everything in it comes from ``verify``: the epsilon column is the one the RDP accountant
replays from the recorded DP parameters (the hospitals' own claims are shown next to it), the
controls are what the logs recorded (not what the configuration intended), and the verification
verdict with every finding is part of the sheet, so it cannot be read without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from audit.verify import VerifyReport, verify

REPORT_NAME, PLOT_NAME = "audit-report.md", "epsilon.png"
# Run settings an ethics board asks about, in the order they are shown (others follow).
CONTROL_KEYS = (
    "dp",
    "target-epsilon",
    "delta",
    "max-grad-norm",
    "epsilon-budget",
    "stats-budget-fraction",
    "secure-aggregation",
    "secagg-threshold",
    "secagg-clip-range",
    "min-hospitals",
    "tls",
    "node-auth",
    "strategy",
    "num-rounds",
    "local-epochs",
    "batch-size",
    "dataset",
    "model",
)


def write_report(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    ledger_dir: str | Path | None = None,
    attack: Mapping[str, Any] | None = None,
    trusted_keys: Mapping[str, str] | None = None,
) -> Path:
    """Verify ``paths`` and write ``out_dir/audit-report.md`` + ``epsilon.png``; returns the Markdown path.

    ``attack``: optional ``AttackResult.to_dict()`` of an empirical membership-inference audit,
    shown in its own section.
    """
    return write_verified_report(verify(list(paths), ledger_dir, trusted_keys), out_dir, attack)


def write_verified_report(report: VerifyReport, out_dir: str | Path, attack: Mapping[str, Any] | None = None) -> Path:
    """``write_report`` for an already computed ``VerifyReport``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(report, out / PLOT_NAME)
    md = out / REPORT_NAME
    md.write_text(render_markdown(report, PLOT_NAME, attack), encoding="utf-8")
    return md


def render_markdown(report: VerifyReport, plot_name: str, attack: Mapping[str, Any] | None = None) -> str:
    """The datasheet text (see ``write_report``)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "PASSED" if report.ok else "FAILED"
    lines = [
        "# fedcare privacy audit: datasheet",
        "",
        f"Generated {now} by `fedcare audit report` from {len(report.files)} audit log(s)"
        + (f" and {len(report.ledgers)} privacy ledger(s)" if report.ledgers else "")
        + ".",
        "",
        f"**Verification: {verdict}** ({len(report.errors)} error(s), {len(report.notes)} note(s)). "
        "Hash chains, Ed25519 signatures, node-vs-server cross-checks and every recorded epsilon "
        "(replayed with Opacus's RDP accountant) were checked.",
        "",
    ]
    lines += _privacy_section(report, plot_name)
    lines += _refusals_section(report)
    lines += _controls_section(report)
    if attack:
        lines += _attack_section(attack)
    lines += _verification_section(report)
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3g}"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _privacy_section(report: VerifyReport, plot_name: str) -> list[str]:
    lines = ["## Privacy spent per hospital", ""]
    if not report.hospitals:
        return [*lines, "No node (hospital) audit log was supplied.", ""]
    lines += [
        "Epsilon is cumulative over every release on the same data, across rounds and runs "
        "(the accountant's value from the recorded noise multiplier, sample rate and steps).",
        "",
        "| hospital | data | releases (DP / no DP) | refusals | delta | epsilon (replayed) | last claimed | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for actor, h in sorted(report.hospitals.items()):
        keys = sorted({r.data_key for r in h.releases}) or ["-"]
        for fp in keys:
            rel = [r for r in h.releases if r.data_key == fp]
            dp = sum(1 for r in rel if r.dp is not None)
            claimed = next((r.epsilon_after for r in reversed(rel) if r.epsilon_after is not None), None)
            runs = sorted({r.run_id for r in rel})
            shown = fp if rel and rel[0].dataset_id else fp[:12]
            lines.append(
                f"| {_cell(actor)} | `{_cell(shown)}` | {dp} / {len(rel) - dp} | {len(h.refusals)} | "
                f"{_fmt(h.delta.get(fp), 6)} | {_fmt(h.epsilon.get(fp))} | {_fmt(claimed)} | "
                f"{_cell(', '.join(runs)) or '-'} |"
            )
    lines += ["", f"![epsilon per hospital over releases]({plot_name})", ""]
    for actor, h in sorted(report.hospitals.items()):
        if not h.releases:
            continue
        lines += [
            f"### {actor}",
            "",
            "| run | round | stage | noise multiplier | sample rate | steps | max grad norm "
            "| secure aggregation | epsilon after (claimed) | epsilon after (replayed) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in h.releases:
            params = r.dp or {}
            sa = r.secagg or {}
            secagg = sa.get("role", "-") + (f", t={sa['threshold']}" if sa.get("threshold") else "")
            lines.append(
                f"| {_cell(r.run_id)} | {r.round} | {r.stage} | {_fmt(params.get('noise_multiplier'))} | "
                f"{_fmt(params.get('sample_rate'))} | {_fmt(params.get('steps'))} | {_fmt(params.get('max_grad_norm'))} | "
                f"{secagg} | {_fmt(r.epsilon_after)} | {_fmt(r.epsilon_replayed)} |"
            )
        lines.append("")
    return lines


def _refusals_section(report: VerifyReport) -> list[str]:
    rows = [(a, r) for a, h in sorted(report.hospitals.items()) for r in h.refusals]
    lines = ["## Refusals", ""]
    if not rows:
        return [*lines, "No hospital refused a request.", ""]
    lines += ["| hospital | run | round | kind | reason |", "|---|---|---|---|---|"]
    lines += [
        f"| {_cell(a)} | {_cell(r['run_id'])} | {r['round']} | {_cell(r['kind'])} | {_cell(r['reason'])} |"
        for a, r in rows
    ]
    return [*lines, ""]


def _controls_section(report: VerifyReport) -> list[str]:
    lines = ["## Controls recorded", ""]
    for run in report.runs:
        settings = run.body["settings"]
        keys = [k for k in CONTROL_KEYS if k in settings] + sorted(k for k in settings if k not in CONTROL_KEYS)
        lines += [f"Run `{run.body['run_id']}` (server log, {run.time}):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_fmt(settings[k]))} |" for k in keys]
        for missing in ("tls", "node-auth"):
            if missing not in settings:
                lines.append(f"| {missing} | not recorded |")
        lines.append("")
    if not report.runs:
        lines += [
            "No server `run` record was supplied: the run settings (TLS, node authentication, budgets) "
            "are not recorded here.",
            "",
        ]
    releases = [r for h in report.hospitals.values() for r in h.releases]
    dp = [r.dp for r in releases if r.dp is not None]
    train = [r.dp for r in releases if r.dp is not None and r.stage == "train"] or dp
    bullets = []
    if dp:
        sig = [d["noise_multiplier"] for d in train]
        rate = [d["sample_rate"] for d in train]
        norms = sorted({d["max_grad_norm"] for d in train if d.get("max_grad_norm") is not None})
        bullets.append(
            f"DP-SGD on {len(train)} training release(s): noise multiplier {min(sig):.4g}-{max(sig):.4g}, "
            f"sample rate {min(rate):.4g}-{max(rate):.4g}, max grad norm {norms or '-'}, "
            f"delta {sorted({d['delta'] for d in dp})}"
        )
    if len(dp) < len(releases):
        bullets.append(f"{len(releases) - len(dp)} release(s) without differential privacy")
    roles = sorted(cast(set[str], {(r.secagg or {}).get("role", "not recorded") for r in releases}))
    if releases:
        bullets.append(f"releases sent as: {', '.join(roles)}")
    thresholds = sorted(
        cast(
            set[int],
            {(e.body.get("secagg") or {}).get("threshold") for e in report.rounds if e.body.get("secagg")} - {None},
        )
    )
    if report.rounds:
        survivors = [len(e.body["secagg"].get("survivors", [])) for e in report.rounds if e.body.get("secagg")]
        bullets.append(
            f"{len(report.rounds)} server round(s); secure-aggregation threshold "
            f"{', '.join(map(str, thresholds)) or 'not recorded'}"
            + (f", fewest survivors in a round {min(survivors)}" if survivors else "")
        )
        failed = sum(len(e.body["failed"]) for e in report.rounds)
        refused = sum(len(e.body["refused"]) for e in report.rounds)
        bullets.append(f"server-recorded failures {failed}, refusals {refused}")
    lines += [f"- {b}" for b in bullets] or ["- no releases recorded"]
    return lines + _signing_keys_lines(report)


def _signing_keys_lines(report: VerifyReport) -> list[str]:
    lines = [
        "",
        "Signing keys (compare with the keys registered for each hospital and the coordinator):",
        "",
        "| log | actor | public key (Ed25519) | last seq | head hash |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(f)} | {_cell(h['actor'])} | `{h['pubkey']}` | {h['last_seq']} | `{h['head_hash'][:16]}` |"
        for f, h in report.heads.items()
    ]
    return [*lines, "", "A log's head hash lets a later audit show that no record was removed from its end.", ""]


def _attack_section(attack: Mapping[str, Any]) -> list[str]:
    from audit.membership_attack import render_rows

    lines = [
        "## Empirical membership-inference audit",
        "",
        "| " + " | ".join(attack_rows_header()) + " |",
        "|" + "---|" * len(attack_rows_header()),
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in render_rows([attack])]
    return [*lines, "", str(attack.get("note", "")), ""]


def attack_rows_header() -> list[str]:
    from audit.membership_attack import ROW_HEADER

    return list(ROW_HEADER)


def _verification_section(report: VerifyReport) -> list[str]:
    lines = ["## Verification findings", ""]
    if not report.findings:
        return [*lines, "None: every chain, signature, cross-reference and epsilon checked out.", ""]
    lines += ["| level | file | line | reason |", "|---|---|---|---|"]
    lines += [f"| {f.level} | {_cell(f.file)} | {f.line} | {_cell(f.reason)} |" for f in report.findings]
    return [*lines, ""]


def _plot(report: VerifyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = False
    for actor, h in sorted(report.hospitals.items()):
        points = [r for r in h.releases if r.epsilon_replayed is not None]
        if not points:
            continue
        xs = list(range(1, len(points) + 1))
        (line,) = ax.plot(
            xs, cast(list[float], [r.epsilon_replayed for r in points]), marker="o", markersize=3, label=actor
        )
        _mark_runs(ax, points, line.get_color())
        plotted = True
    ax.set_xlabel("release number (feature statistics and training rounds, all runs)")
    ax.set_ylabel("cumulative epsilon (RDP accountant)")
    ax.set_title("Privacy spent per hospital")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no DP releases recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mark_runs(ax: Any, points: list[Any], colour: Any) -> None:
    """A dotted vertical line, in the hospital's colour, where its next run starts (epsilon accumulates)."""
    for i in range(1, len(points)):
        if points[i].run_id != points[i - 1].run_id:
            ax.axvline(i + 0.5, color=colour, linestyle=":", linewidth=1.0)
            ax.annotate(
                f"run {points[i].run_id}", (i + 0.55, points[i].epsilon_replayed), fontsize=7, color=colour, va="bottom"
            )
