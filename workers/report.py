"""The evaluation report: Markdown with PNG plots, one scorer beside another."""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from workers.config import TIER_NAMES  # noqa: E402
from workers.evaluation import POINTS, calibration_bins, said_of_tier_a, tier_table  # noqa: E402
from workers.store_data import said_of_time_to_convert  # noqa: E402

MIN_EACH_OUTCOME_TO_RANK = 20  # converted leads, and unconverted, for a ranking read without a caveat
MIN_TIER_LEADS = 30  # leads in a tier, for its conversion rate read without a caveat

# Okabe and Ito's colour-blind-safe palette, less its orange, sky blue and yellow, which stand under
# 3:1 against white (WCAG's least for lines and bars). Colour is never all that tells scorers apart:
# each also has its own line style and marker, or hatch on its bars.
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "--")
REFERENCE = {"color": "grey", "linestyle": ":", "linewidth": 1.5, "zorder": 1}  # chance, perfect, overall
DPI = 150


@contextmanager
def _figure(path: Path, size: tuple[float, float] = (5.5, 6)):
    """One plot saved to `path` as PNG, its legend below the plot, where it covers no curve or bar;
    closed whatever happens."""
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    try:
        yield ax
        fig.legend(loc="outside lower center", ncols=2)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def _scorer_line(i: int, dense: bool = False) -> dict:
    """The i-th scorer's colour, line style and marker; on a dense curve, markers spaced out along it
    (offset from one scorer to the next, so they do not sit on each other where curves meet)."""
    style = {"color": COLOURS[i % len(COLOURS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
             "marker": MARKERS[i % len(MARKERS)]}  # fmt: skip
    return {**style, "markevery": (0.02 * (i % 5), 0.1)} if dense else style


def _diagonal(ax, label: str) -> None:
    ax.plot([0, 1], [0, 1], label=label, **REFERENCE)


def _roc(path: Path, curves: dict) -> None:
    with _figure(path) as ax:
        for i, (name, (y, p, _)) in enumerate(curves.items()):
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=name, **_scorer_line(i, dense=True))
        _diagonal(ax, "chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")


def _calibration(path: Path, curves: dict) -> None:
    with _figure(path) as ax:
        for i, (name, (y, p, _)) in enumerate(curves.items()):
            _, predicted, observed = calibration_bins(y, p)
            ax.plot(predicted, observed, label=name, **_scorer_line(i))
        _diagonal(ax, "perfectly calibrated")
        ax.set(xlabel="score / 100", ylabel="observed conversion rate", title="Calibration")


def _tiers(path: Path, curves: dict) -> None:
    """Bars of each scorer's conversion rate by tier, labelled upright with their lead counts, which
    side by side would run into each other; wider with more scorers, so the bars stay wide enough."""
    with _figure(path, (max(6.0, 2.0 + len(curves)), 5)) as ax:
        width = 0.8 / max(1, len(curves))
        x = np.arange(len(TIER_NAMES))
        for i, (name, (y, _, tiers)) in enumerate(curves.items()):
            rates, labels = tier_bars(y, tiers)
            ax.bar(x + i * width, rates, width, label=name, color=COLOURS[i % len(COLOURS)],
                   hatch=HATCHES[i % len(HATCHES)], edgecolor="white")  # fmt: skip
            for left, top, label in zip(x + i * width, np.nan_to_num(rates), labels, strict=True):
                ax.text(left, top + 0.01, label, ha="center", va="bottom", rotation=90, fontsize=8)
        _overall_rates(ax, curves)
        centres = x + width * (len(curves) - 1) / 2
        ax.set_xticks(centres, TIER_NAMES)
        ax.set_xlim(centres[0] - 0.5, centres[-1] + 0.5)  # an empty tier, unplotted, keeps its place
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set(ylabel="conversion rate", title="Conversion rate by tier", ylim=(0, 1.3))  # room for labels


def _overall_rates(ax, curves: dict) -> None:
    """One grey line at the overall conversion rate of the leads measured; scorers measured on other
    leads (each live scorer on its own) get a line of their own, named in the legend."""
    rates: dict[float, list[str]] = {}
    for name, (y, _, _) in curves.items():
        rates.setdefault(float(np.mean(y)), []).append(name)
    for (rate, names), linestyle in zip(rates.items(), itertools.cycle((":", "--", "-."))):
        label = "overall conversion rate" + ("" if len(rates) == 1 else f" of {', '.join(names)}")
        ax.axhline(rate, **{**REFERENCE, "linestyle": linestyle}, label=label)


def tier_bars(y: np.ndarray, tiers: list[str]) -> tuple[list[float], list[str]]:
    """Each tier's conversion rate and its bar's label, the tier's lead count: a tier without leads
    gets NaN, no bar, since drawn as 0% it would look like a tier whose leads never convert."""
    rows = tier_table(y, tiers)
    rates = [math.nan if row["conversion_rate"] is None else row["conversion_rate"] for row in rows]
    return rates, [f"n={row['leads']}" for row in rows]


def _gains(path: Path, curves: dict, cumulative_gains) -> None:
    with _figure(path) as ax:
        for i, (name, (y, p, _)) in enumerate(curves.items()):
            ax.plot(*cumulative_gains(y, p), label=name, **_scorer_line(i, dense=True))
        _diagonal(ax, "random order")
        ax.set(xlabel="share of leads called, best scores first", ylabel="share of conversions reached",
               title="Cumulative gains")  # fmt: skip


MISSING = "n/a"


def _fmt(value) -> str:
    return MISSING if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1%}"


def _times(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def _source(summary: dict) -> str:
    parts = []
    if "file" in summary["data"]:
        parts.append(
            f"Data: `{summary['data']['file']}` ({summary['rows']} leads, overall conversion "
            f"{summary['base_rate']:.1%})."
        )
    if any(name.startswith("live ") for name in summary["scorers"]):
        parts.append(
            f"`live …` rows are the scores the workers wrote, from the score store: {_live_snapshot(summary)}"
        )
    return " ".join(
        [*parts, f"Scoring config: `{summary['scoring_config']}`.", f"Evaluated {summary['evaluated_at']}."]
    )


def _live_snapshot(summary: dict) -> str:
    """Which of each lead's scores the live rows grade (the last ones flatter, and the report says so),
    and what counts as converted."""
    live = summary["live"]
    days = live["min_age_days"]
    if live["snapshot"] == "first":
        graded = (
            "each lead's first score (`--snapshot first`), as reps saw the lead when they chose whom to call"
        )
    else:
        graded = (
            f"each lead's last score before it converted, or its last in its first {days:g} days "
            "(`--snapshot last`); later scores show what reps made of the lead, so these rows flatter every "
            "scorer"
        )
    horizon = f"within {days:g} days of its first score" if days > 0 else "at any time so far"
    return f"{graded}. A lead counts as converted if it converted {horizon}."


def markdown(summary: dict) -> str:
    lines = ["# leadscore evaluation", "", _source(summary)]
    if summary["scorers"]:
        lines += _scorer_tables(summary["scorers"], summary["scoring_config"])
    store = summary.get("store")
    if store:
        lines += _store_tables(store, summary["live"])
    if summary["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in summary["notes"])]
    if summary["scorers"]:
        lines += ["", "## Plots", "", *_plots(summary["scorers"])]
    return "\n".join([*lines, ""])


def _plots(scorers: dict) -> list[str]:
    """The plots, each with alt text that says what it shows, for a reader who cannot see it."""
    names = _listed(list(scorers))
    aucs = ", ".join(f"{name} {s['roc_auc']:.4f}" for name, s in scorers.items())
    described = {
        "roc.png": f"ROC curves of {names} (ROC AUC {aucs}): true positive rate against false positive "
        "rate, the diagonal being chance",
        "calibration.png": f"Calibration of {names}: observed conversion rate against score / 100, a point "
        "per ten-point score bin, the diagonal being perfectly calibrated",
        "tiers.png": f"Conversion rate in tiers A to D of {names}, each bar labelled with its number of "
        "leads, a grey line at the overall conversion rate (figures in the Tiers table)",
        "gains.png": f"Cumulative gains of {names}: share of conversions reached against share of leads "
        "called, best scores first, the diagonal being random order (figures in the Cumulative gains table)",
    }
    shown = [f"![{alt.replace('[', '(').replace(']', ')')}]({png})" for png, alt in described.items()]
    return [f"{shown[0]} {shown[1]}", "", f"{shown[2]} {shown[3]}"]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


# Which way each metric is better, said under the table, since the table cannot say it.
METRICS_READ = (
    "ROC AUC and PR AUC: higher is better (0.5 is chance for ROC AUC, the conversion rate for PR AUC); "
    "Brier and ECE: lower is better."
)


def _scorer_tables(scorers: dict, config: str) -> list[str]:
    lines = [
        "",
        "| scorer | leads | conversion rate | ROC AUC | PR AUC | Brier | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in scorers.items():
        lines.append(
            f"| {name} | {s['leads']} | {_percent(s['base_rate'])} | {_fmt(s['roc_auc'])} "
            f"| {_fmt(s['pr_auc'])} | {_fmt(s['brier'])} | {_fmt(s['ece'])} |"
        )
    lines += ["", METRICS_READ, "", _best_ranking(scorers)]
    lines += _bullets([
        _points_scale(scorers),
        *(_too_few_outcomes(name, s) for name, s in scorers.items()),
        *(_capped(name, s, config) for name, s in scorers.items()),
        *(_llm_adds(name, s) for name, s in scorers.items()),
    ])  # fmt: skip
    lines += [
        "",
        "## Tiers",
        "",
        "| scorer | tier | leads | share | converted | conversion rate | 95% interval | lift |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in scorers.items():
        for row in s["tiers"]:
            interval = (
                MISSING if row["ci95"] is None else " to ".join(_percent(bound) for bound in row["ci95"])
            )
            lines.append(
                f"| {name} | {row['tier']} | {row['leads']} | {row['share']:.1%} | {row['converted']} | "
                f"{_percent(row['conversion_rate'])} | {interval} | {_times(row['lift'])} |"
            )
    lines += _bullets(_small_tiers(name, s) for name, s in scorers.items())
    lines += _gains_table(scorers)
    for name, s in scorers.items():
        cv = s.get("cross_validation")
        if cv:
            lines += _cross_validation_table(name, s)
    return lines


def _best_ranking(scorers: dict) -> str:
    """The conclusion first looked for: which scorer ranks the leads best, and what its tier A gives."""
    name, best = max(scorers.items(), key=lambda item: item[1]["roc_auc"])  # the first of any tied
    tied = [f"`{other}`" for other, s in scorers.items() if other != name and s["roc_auc"] == best["roc_auc"]]
    said = (
        f"Best at ranking leads: `{name}` (ROC AUC {best['roc_auc']:.4f}"
        f"{', tied with ' + _listed(tied) if tied else ''}); "
        f"{said_of_tier_a(best['tiers'], best['base_rate'])}."
    )
    if best.get("in_sample"):
        said += " It learned from some of these leads, so its numbers are optimistic (see the notes)."
    return said


def _gains_table(scorers: dict) -> list[str]:
    """The gains plot's figures at the shares of leads a team calls first."""
    shares = list(next(iter(scorers.values()))["conversions_reached"])
    lines = ["", "## Cumulative gains", "",
             "Share of all conversions reached by calling the top share of leads, best scores first: higher "
             f"is better; calling in random order reaches as many as it calls ({shares[0]} for {shares[0]}).",
             "", f"| scorer | {' | '.join(f'top {share}' for share in shares)} |",
             f"|---|{'---|' * len(shares)}"]  # fmt: skip
    for name, s in scorers.items():
        lines.append(f"| {name} | {' | '.join(_percent(v) for v in s['conversions_reached'].values())} |")
    return lines


def _cross_validation_table(name: str, scorer: dict) -> list[str]:
    """The candidates' out-of-fold ECE is of their raw probabilities: only the kept one is calibrated,
    so its calibrated figure stands in a column of its own."""
    calibrated = f"out-of-fold ECE, {scorer['calibration']}-calibrated"
    lines = ["", f"## Cross-validation behind `{name}`", "",
             f"| candidate | CV ROC AUC | sd across folds | out-of-fold ECE, uncalibrated | {calibrated} |",
             "|---|---|---|---|---|"]  # fmt: skip
    for candidate, m in scorer["cross_validation"].items():
        kept = candidate == scorer["kept_candidate"]
        lines.append(
            f"| {candidate}{' (kept)' if kept else ''} | {m['cv_auc_mean']:.4f} | {m['cv_auc_sd']:.4f} "
            f"| {m['oof_ece']:.4f} | {_fmt(scorer['calibrated_oof_ece'] if kept else None)} |"
        )
    return [*lines, "", "The calibrated ECE is that of the kept candidate's out-of-fold scores once "
            "calibrated and rounded to 0 to 100 as written (`expected` in its model.json)."]  # fmt: skip


def _capped(name: str, scorer: dict, config: str) -> str | None:
    """A model's numbers depend on the scoring config too: the statuses it caps cap the model."""
    if not scorer.get("capped"):
        return None
    return (
        f"`{name}`: {scorer['capped']} leads capped by their status, as scoring config `{config}` caps "
        "them in production; another config caps other leads."
    )


def llm_adds(scorer: dict) -> str | None:
    """What the LLM's part of a rules+LLM score adds to the rules' ranking, and whether the leads
    measured can tell it from nothing."""
    adds = scorer.get("llm_adds")
    if not adds:
        return None
    converted, unconverted = _outcome_counts(scorer)
    if min(converted, unconverted) < MIN_EACH_OUTCOME_TO_RANK:
        return (
            f"what the LLM's part adds to the ROC AUC of the rules alone ({adds['roc_auc']:+.4f}) rests on "
            f"{converted} converted and {unconverted} unconverted leads: too few to tell"
        )
    low, high = adds["ci95"]
    verdict = (
        "it includes 0, so these leads cannot tell it from none" if low <= 0 <= high else "it excludes 0"
    )
    return (
        f"the LLM's part adds {adds['roc_auc']:+.4f} to the ROC AUC of the rules alone "
        f"(95% interval {low:+.4f} to {high:+.4f}: {verdict})"
    )


def _llm_adds(name: str, scorer: dict) -> str | None:
    said = llm_adds(scorer)
    if said is None:
        return None
    return (
        f"`{name}`: on the same {scorer['leads']} leads, {said}. `{name} without the LLM` is those leads' "
        "scores with the LLM's part taken out, as when it is down, tiered by today's scoring config."
    )


def _outcome_counts(scorer: dict) -> tuple[int, int]:
    """(converted, unconverted) leads the scorer was measured on."""
    converted = sum(row["converted"] for row in scorer["tiers"])
    return converted, scorer["leads"] - converted


def _points_scale(scorers: dict) -> str | None:
    """Brier and ECE treat a score / 100 as a probability, which the rules' points never claimed to be."""
    names = [f"`{name}`" for name, s in scorers.items() if s["scale"] == POINTS]
    if not names:
        return None
    return (
        f"{', '.join(names)}: the rules' 0 to 100 is a points scale, not a probability, so Brier and ECE "
        "measure it against a scale it was not built for; compare the rules by ROC AUC, PR AUC and tier lift."
    )


def _too_few_outcomes(name: str, scorer: dict) -> str | None:
    """A ranking measured on a handful of conversions (or of leads that did not convert) can swing
    widely from one sample to the next."""
    converted, unconverted = _outcome_counts(scorer)
    if min(converted, unconverted) >= MIN_EACH_OUTCOME_TO_RANK:
        return None
    return (
        f"`{name}`: {converted} converted and {unconverted} unconverted leads: too few outcomes to rank "
        f"reliably (its ROC AUC, PR AUC and curves want at least {MIN_EACH_OUTCOME_TO_RANK} of each)."
    )


def _small_tiers(name: str, scorer: dict) -> str | None:
    """Tiers whose conversion rate rests on few leads (empty ones have no rate at all)."""
    small = [
        f"tier {row['tier']} ({row['leads']} leads)"
        for row in scorer["tiers"]
        if 0 < row["leads"] < MIN_TIER_LEADS
    ]
    if not small:
        return None
    return (
        f"`{name}`: {', '.join(small)}: fewer than {MIN_TIER_LEADS} leads, so conversion and lift are rough; "
        "the 95% interval says how rough."
    )


def _bullets(notes) -> list[str]:
    """A list under a table, of the notes that apply."""
    kept = [f"- {note}" for note in notes if note]
    return ["", *kept] if kept else []


def _cut(store: dict) -> str:
    if not store["history_cut"]:
        return ""
    return (
        f" Left out of learning and of the holdout's comparison: {store['history_cut']} leads some of whose "
        "scores `db prune` deleted (their first kept score is not their first)."
    )


def _store_tables(store: dict, live: dict) -> list[str]:
    lines = [
        "", "## From the score store", "",
        f"Scores kept: {store['scores']}, leads: {store['leads']}, converted since first scored: "
        f"{store['converted']}. Of leads first scored over {live['min_age_days']:g} days ago: "
        f"{said_of_time_to_convert(live['time_to_convert'], live['min_age_days'])}.{_cut(store)}",
        "", "### Holdout (no visible score)", "",
        "Leads first scored while the holdout ran in their account (from its first held-out lead to its "
        f"last) and at least {store['min_age_days']:g} days ago, converted since. Left out: newer leads, "
        "still waiting; leads that had converted before their first score; and leads scored outside the "
        "holdout's run, which have no held-out peers (e.g. from before `HOLDOUT_SHARE` was set).", "",
        "| group | leads | converted | rate | waiting | converted before | outside the holdout's run |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for group, row in store["holdout"].items():
        lines.append(
            f"| {group} | {row['leads']} | {row['converted']} | {_percent(row['rate'])} | {row['waiting']} "
            f"| {row['converted_before']} | {row['outside_holdout']} |"
        )
    lines += ["", _holdout_difference(store["shown_minus_holdout"], store["holdout"])]
    lines += [
        "",
        "### Rep feedback",
        "",
        "| tier shown | too_high | right | too_low |",
        "|---|---|---|---|",
    ]
    for tier, row in store["feedback"].items():
        counts = " | ".join(str(row.get(value, 0)) for value in ("too_high", "right", "too_low"))
        lines.append(f"| {tier} | {counts} |")
    return lines


def _holdout_difference(difference: dict | None, groups: dict[str, dict]) -> str:
    if difference is None:
        if not any(groups["holdout"][count] for count in ("leads", "waiting", "converted_before")):
            return (
                "No difference: no lead was held out (set `HOLDOUT_SHARE` above 0 to measure the difference)."
            )
        waiting = sum(row["waiting"] for row in groups.values())
        if waiting:
            return f"No difference yet: a group has no leads old enough ({waiting} waiting)."
        return "No difference yet: a group has no leads to compare."
    low, high = difference["ci95"]
    said = (
        "the interval includes 0, so these leads cannot yet tell whether showing the score changes conversion"
        if low <= 0 <= high
        else f"showing the score goes with {'higher' if low > 0 else 'lower'} conversion"
    )
    interval = f"95% interval {low:+.1f} to {high:+.1f}"
    return f"Shown minus holdout: {difference['points']:+.1f} points ({interval}): {said}."


def plots(out: Path, curves: dict, cumulative_gains) -> None:
    """The four plots, each scorer drawn alike in all of them."""
    _roc(out / "roc.png", curves)
    _calibration(out / "calibration.png", curves)
    _tiers(out / "tiers.png", curves)
    _gains(out / "gains.png", curves, cumulative_gains)


def write(out: Path, summary: dict, curves: dict, cumulative_gains) -> None:
    """The report, with its plots when some scorer can be ranked."""
    if curves:
        plots(out, curves, cumulative_gains)
    (out / "report.md").write_text(markdown(summary))
