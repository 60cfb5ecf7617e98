"""The audit's report: markdown with two PNG plots (matplotlib, imported when writing).

``write_report(result, out_dir, command)`` writes ``AUDIT.md``, ``audit_fidelity.png``
(substitute fidelity against queries sent) and ``audit_refusals.png`` (the share of each
run's queries refused so far, against queries sent) and returns their paths.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .run import AttackRun, AuditResult
from .substitutes import agreement_for, thieves_for
from .wire import EMBEDDINGS, TEXT

REPORT = "AUDIT.md"
FIDELITY_PLOT = "audit_fidelity.png"
REFUSALS_PLOT = "audit_refusals.png"
COLOURS = ("#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#66408c", "#8c564b")
_FIDELITY_OF = {
    EMBEDDINGS: "Fidelity: retrieval agreement of the `embedding` thief, a ridge regression "
    "from the inputs' features (hashed word counts, or the scaled numeric features) to the "
    "embeddings a run received: the share of held-out samples whose copied embedding is "
    "nearest (cosine, among the held-out samples' reference embeddings) to the sample's own "
    "reference embedding. Chance is one over the number of held-out samples; the mean "
    "cosine of copy and reference is in the `--json` output.",
    TEXT: "Fidelity: next-word agreement of the `text` thief, a word-bigram model of the "
    "completions a run received (its first word conditioned on the prompt's last word): "
    "the share of positions of the held-out prompts' reference completions where the "
    "copy's most likely next word, given the reference's previous word, is the reference's "
    "word. It measures how well a small imitation reproduces the endpoint's wording, not "
    "what distilling a capable language model from the answers would give.",
}
_CLASSIFIER_FIDELITY = (
    "Fidelity: top-1 agreement of a substitute trained on the answers a run received "
    "with the reference answers on the held-out samples (the `soft` thief regresses "
    "the answer rows, the `label` thief learns the top-1 only)."
)


def require(module: str, extra: str, what: str) -> None:
    """A clear error when an optional dependency of the audit is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(
            f"{what} needs {module}: pip install 'asgi-extraction-shield[{extra}]'"
        )


def write_report(result: AuditResult, out: Path, command: str) -> list[Path]:
    require("matplotlib", "lab", "the audit report's plots")
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        _fidelity_plot(result, out / FIDELITY_PLOT),
        _refusals_plot(result, out / REFUSALS_PLOT),
    ]
    report = out / REPORT
    report.write_text(markdown(result, command), encoding="utf-8")
    return [report, *plots]


def _final(run: AttackRun, thief: str) -> float | None:
    if not run.fidelity or thief not in run.fidelity or not run.fidelity[thief]:
        return None
    curve = run.fidelity[thief]
    return curve[max(curve)]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _at(value: int | None) -> str:
    return "never" if value is None else f"query {value + 1}"


def markdown(result: AuditResult, command: str) -> str:
    s = result.summary()
    c = result.config
    lines = [
        f"# Extraction audit of `{result.target_url}`",
        "",
        f"Made by `{command}`: {s['requests']:,} requests in {s['seconds']:.0f} s"
        + (" (stopped by the time limit)." if result.stopped_by_time_limit else "."),
        f"Format `{c.format}`, answers read as {result.answer_kind}; {result.samples} samples: "
        f"{result.pool} for the attacker's pool, {result.held_out} held out to score the "
        f"thieves' copies. Budget {c.budget} queries per run; sybil runs split it over "
        f"{c.identities} API keys.",
        "",
        "## Summary",
        "",
    ]
    reacted = [run for run in result.runs if run.first_reaction is not None]
    lines.append(
        f"- **The shield reacted** (refused, or answered a canary differently) in "
        f"{len(reacted)} of {len(result.runs)} attack runs."
    )
    for split in ("single", "sybil"):
        best = result.max_fidelity(split)
        if best is not None:
            lines.append(
                f"- **Best copy from {'one identity' if split == 'single' else 'sybils'}**: "
                f"{_pct(best)} {agreement_for(result.answer_kind)} with the endpoint on "
                "held-out samples."
            )
    before, after = result.passes["before"], result.passes["after"]
    lines.append(
        f"- **Benign replay**: {before.refused} of {before.sent} refused before the attacks, "
        f"{after.refused} of {after.sent} after; {after.changed_top1} of {after.compared} "
        "top-1 answers changed after the attacks."
    )
    lines += ["", "## What an attacker would get", ""]
    thieves = thieves_for(result.answer_kind)
    lines.append(
        _FIDELITY_OF.get(result.answer_kind, _CLASSIFIER_FIDELITY)
        + " Scored after a quarter, half and all of the budget; a run stopped after 100 "
        "refusals in a row keeps its last fidelity for the rest of its budget."
    )
    lines += [
        "",
        "| attack | identities | sent | answered | refused | "
        + " | ".join(f"{t} fidelity" for t in thieves)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(thieves),
    ]
    for run in result.runs:
        r = run.summary()
        lines.append(
            f"| {run.attack} | {run.identities} | {r['sent']} | {r['answered']} | "
            f"{r['refused']} | " + " | ".join(_pct(_final(run, t)) for t in thieves) + " |"
        )
    lines += ["", f"![fidelity against queries]({FIDELITY_PLOT})", ""]
    lines += ["## When the shield reacted", ""]
    lines.append(
        f"A canary is a held-out sample the attacking identity sends every "
        f"{c.canary_every} queries; it is *perturbed-looking* when its answer differs from "
        f"the reference by more than {result.tolerance:.2g} (twice the benign repeat's "
        "largest difference) or in its top-1."
    )
    lines += [
        "",
        "| attack | identities | first reaction | first refusal | status | problem type | "
        "first perturbed canary | perturbed canaries | RateLimit-Policy | Retry-After | stopped by |",
        "|---|---:|---|---|---:|---|---|---:|---|---:|---|",
    ]
    for run in result.runs:
        kind = (run.refusal_type or "–").rsplit("#", 1)[-1]
        lines.append(
            f"| {run.attack} | {run.identities} | {_at(run.first_reaction)} | "
            f"{_at(run.first_refusal)} | {run.refusal_status or '–'} | {kind} | "
            f"{_at(run.first_perturbed)} | {run.perturbed_canaries}/{run.canaries} | "
            f"`{run.ratelimit_policy or '–'}` | {run.retry_after or '–'} | {run.stopped} |"
        )
    lines += ["", f"![refusals against queries]({REFUSALS_PLOT})", ""]
    lines += ["## What a benign user experienced", ""]
    lines.append(
        f"{c.benign_users} fresh identities share a replay of the held-out samples and part "
        "of the pool, each its own slice, before the attacks (`before`, the reference), at "
        "once again (`repeat`) and after them (`after`)."
    )
    lines += [
        "",
        "| pass | sent | refused | failed | latency p50 | latency p95 | compared | "
        "top-1 changed | largest change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in result.passes.items():
        b: dict[str, Any] = p.summary()
        lines.append(
            f"| {name} | {b['sent']} | {b['refused']} | {b['failed']} | "
            f"{b['latency_ms_p50']:.1f} ms | {b['latency_ms_p95']:.1f} ms | {b['compared']} | "
            f"{b['changed_top1']} | {b['max_distance']:.3g} |"
        )
    lines += ["", "## What this audit can and cannot tell", ""]
    lines += [
        "- The audit never sees the model without the shield: answers are compared with "
        "those a fresh identity got first. A shield that perturbs every answer "
        "(`PERTURBATION`) perturbs the reference too. To see the unprotected baseline, "
        "audit a staging copy with `EXTRACTION_SHIELD_MODE=shadow`.",
        "- Simulated identities differ by API key (`--header`). They all come from this "
        "host, so a shield that identifies clients by IP address sees one client: "
        "IP-based sybils cannot be simulated from one host.",
        "- Runs follow each other against one live shield: what it learned of earlier runs "
        "(pooled and cohort signals) can make it react sooner to later ones.",
        "- The thieves are small models trained on a few hundred answers; a determined "
        "attacker with a bigger budget, more keys or more time gets more.",
    ]
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _style(run: AttackRun, attacks: list[str]) -> dict[str, Any]:
    return {
        "color": COLOURS[attacks.index(run.attack) % len(COLOURS)],
        "linestyle": "-" if run.split == "single" else "--",
        "label": f"{run.attack} ({run.identities} id)",
    }


def _fidelity_plot(result: AuditResult, path: Path) -> Path:
    attacks = list(dict.fromkeys(run.attack for run in result.runs))
    thieves = thieves_for(result.answer_kind)
    figure = _figure(4.2 * len(thieves), 3.4)
    axes = figure.subplots(1, len(thieves), sharey=True, squeeze=False)[0]
    for ax, thief in zip(axes, thieves, strict=True):
        for run in result.runs:
            curve = (run.fidelity or {}).get(thief)
            if curve:
                budgets = sorted(curve)
                ax.plot(budgets, [curve[b] for b in budgets], marker="o", **_style(run, attacks))
        ax.set_title(f"{thief} thief")
        ax.set_xlabel("queries sent")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{agreement_for(result.answer_kind)} (held out)")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7, loc="lower right")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "not measured for these answers", ha="center", transform=ax.transAxes)
    figure.savefig(path, dpi=110)
    return path


def _refusals_plot(result: AuditResult, path: Path) -> Path:
    attacks = list(dict.fromkeys(run.attack for run in result.runs))
    figure = _figure(6.4, 3.6)
    ax = figure.subplots()
    for run in result.runs:
        if not run.outcomes:
            continue
        refused = [o != "ok" for o in run.outcomes]
        share, total = [], 0
        for i, r in enumerate(refused, start=1):
            total += r
            share.append(total / i)
        style = _style(run, attacks)
        ax.plot(range(1, len(share) + 1), share, **style)
        if run.first_perturbed is not None:
            ax.plot(run.first_perturbed + 1, share[run.first_perturbed], "o", color=style["color"])
    ax.set_xlabel("queries sent (dots: first perturbed-looking canary)")
    ax.set_ylabel("share refused so far")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    figure.savefig(path, dpi=110)
    return path
