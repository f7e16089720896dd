"""`leadscore train`, `score-file` and `evaluate`: the offline side of the model's life.

Each works on a CSV plus a mapping (`workers.tabular`), or on the score store, and writes
plain files a team can open: a model directory, a scored CSV, a report with plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from integration.errors import TableError
from workers import model_scoring, tabular
from workers.blend import ScoreResult, blend_score
from workers.config import TIER_NAMES, ScoringConfig, Tiers
from workers.evaluation import (
    GAINS_SHARES,
    POINTS,
    PROBABILITY,
    classification_metrics,
    conversions_reached,
    cumulative_gains,
    paired_auc_difference,
    said_of_tier_a,
    tier_table,
)
from workers.model import TrainedModel, identifier_like, lead_digests, require_folds, suspected_leaks, train
from workers.progress import progress
from workers.propensity import fallback
from workers.rules import evaluate_rules

RULES = "rules"


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class LabelledTable:
    frame: pd.DataFrame  # the file's rows, as text
    features: pd.DataFrame  # mapped and normalised, as the model matches them
    shown: pd.DataFrame  # the same features as the file spells them, for the reasons reps read
    mapping: tabular.Mapping
    y: np.ndarray | None
    source: dict
    warnings: list[str]  # what reading it warned of: `evaluate` puts them in the report too


def load_table(data: Path, mapping_path: Path, label: str | None, need_label: bool) -> LabelledTable:
    mapping = tabular.load_mapping(mapping_path)
    if label:
        mapping = mapping.model_copy(update={"label": label})
    frame, read_warnings = tabular.read_table(data, mapping, need_label=need_label)
    y = tabular.labels(frame, mapping.label) if need_label else None
    source = {"file": Path(data).name, "sha256": file_digest(data), "mapping": Path(mapping_path).name}
    if mapping.created and need_label:  # the training window: scoring a file needs none
        source.update(tabular.created_window(frame, mapping.created))
    shown, feature_warnings = tabular.feature_frame(frame, mapping)
    warnings = [*read_warnings, *feature_warnings]
    for warning in warnings:
        _warn(warning)
    features = tabular.model_values(shown, mapping.feature_kinds())
    return LabelledTable(frame, features, shown, mapping, y, source, warnings)


def train_from_file(data: Path, mapping_path: Path, label: str | None, out: Path, tiers: Tiers | None = None):
    started = time.perf_counter()
    table = load_table(data, mapping_path, label, need_label=True)
    require_folds(table.y, f"(label {table.mapping.label!r})", "; add labelled rows")
    features, kinds = _without_identifiers(table.features, table.mapping.feature_kinds())
    leaks = _suspected_leaks(features, table.y, kinds, table.mapping.columns(), spelled=table.shown)
    trained = train(
        features, table.y, kinds, source=table.source, tiers=tiers or model_scoring.DEFAULT_MODEL_TIERS,
        progress=progress("cross-validating"), monotone=table.mapping.monotone_for(kinds),
    )  # fmt: skip
    trained.trained_on = lead_digests(table.frame[table.mapping.id])
    return _finish(trained, table.mapping, out, started, leaks)


def train_from_store(
    store, out: Path, min_age_days: float, mapping_path: Path | None = None, tiers: Tiers | None = None,
    snapshot: str = "first",
):  # fmt: skip
    """Learn from the inputs kept with each lead's `snapshot` score (see `store_data.labelled_scores`),
    labelled by the outcomes. A mapping is optional: its [custom] entries give those features' kinds,
    labels and CRM properties, its [monotone] the features kept in order."""
    from workers.store import redacted
    from workers.store_data import training_rows

    started = time.perf_counter()
    mapping = tabular.load_mapping(mapping_path) if mapping_path else None
    custom = {name: spec.kind for name, spec in mapping.custom.items()} if mapping else None
    rows = training_rows(store, min_age_days, custom, snapshot)
    later = "; run `leadscore outcomes sync`, or train once more leads have an outcome"
    require_folds(rows.labels, "in the store", later)
    if rows.unread:
        _warn(f"not learned from: {', '.join(rows.unread)}, kept with earlier scores but not named under "
              "[custom] in a --mapping, so no worker would read it for a live lead; to learn from one, name "
              "it there with the CRM property that holds it")  # fmt: skip
    if rows.empty:
        _warn(f"not learned from: {', '.join(rows.empty)}, which no kept score has a value for: workers "
              "read a [custom] property only while a model that names it is live, so none was kept "
              "yet")  # fmt: skip
    source = {"store": redacted(store.url), **rows.window}
    features, kinds = _without_identifiers(rows.frame, rows.kinds)
    leaks = _suspected_leaks(features, rows.labels, kinds, {name: name for name in kinds}, kept=snapshot)
    trained = train(features, rows.labels, kinds, source=source,
                    tiers=tiers or model_scoring.DEFAULT_MODEL_TIERS, progress=progress("cross-validating"),
                    monotone=mapping.monotone_for(kinds) if mapping else None)  # fmt: skip
    trained.trained_on = lead_digests(rows.leads)
    return _finish(trained, mapping, out, started, leaks)


def _without_identifiers(features: pd.DataFrame, kinds: dict) -> tuple[pd.DataFrame, dict]:
    """The features without those like an id, an email or a name (`model.identifier_like`), named."""
    like_ids = identifier_like(features, kinds)
    if like_ids:
        named = ", ".join(f"{name} ({n:,} values in {rows:,} leads)" for name, (n, rows) in like_ids.items())
        _warn(f"not learned from: {named}, nearly one value a lead, like an id, an email or a name: a model "
              "learns nothing from it that carries to a new lead, and model.json would keep every "
              "value")  # fmt: skip
    kept = {name: kind for name, kind in kinds.items() if name not in like_ids}
    if not kept:
        raise TableError("every feature is like an id, an email or a name: map columns that many leads share "
                         "values of")  # fmt: skip
    return features.drop(columns=list(like_ids)), kept


MAX_LEAK_VALUES_NAMED = 5


def _suspected_leaks(
    features: pd.DataFrame, y: np.ndarray, kinds: dict, columns: dict[str, str],
    spelled: pd.DataFrame | None = None, kept: str | None = None,
) -> list[dict]:  # fmt: skip
    """Warns of each feature that looks recorded after or near the outcome (`model.suspected_leaks`),
    naming where it comes from (`columns`: a file's column, or with `kept`, the input the store keeps
    with each lead's `kept` score); returns them as model.json keeps them."""
    found = []
    for leak in suspected_leaks(features, y, kinds, spelled):
        column = columns[leak.feature]
        origin = f"kept with each lead's {kept} score" if kept else f"column {column!r}"
        values = "; ".join(
            f"{value!r}: {leads:,} leads, {rate:.1%} converted"
            for value, leads, rate in leak.levels[:MAX_LEAK_VALUES_NAMED]
        )
        more = len(leak.levels) - MAX_LEAK_VALUES_NAMED
        _warn(f"feature {leak.feature} ({origin}) looks recorded after or near the outcome: alone it ranks "
              f"leads at ROC AUC {leak.roc_auc:.3f}; {values}{f'; and {more} more' if more > 0 else ''}. "
              "Is it known when a lead is scored? If the team fills it in as it works a lead, the model "
              "learns that disposition, not the lead, and ranks fresh leads, which have none yet, worse "
              "than its cross-validation says: for a model of fresh leads, leave it out of the "
              "mapping")  # fmt: skip
        found.append({
            "feature": leak.feature, "column": column, "roc_auc": round(leak.roc_auc, 4),
            "values": [{"value": value, "leads": leads, "conversion_rate": round(rate, 4)}
                       for value, leads, rate in leak.levels],
        })  # fmt: skip
    return found


def _finish(
    trained: TrainedModel, mapping: tabular.Mapping | None, out: Path, started: float, leaks: list[dict]
):
    if mapping is not None:
        if mapping.monotone and not trained.meta["monotone"]:
            _warn(f"[monotone] is not enforced: {trained.meta['model']} ranked best, and only lightgbm "
                  "keeps features in order")  # fmt: skip
        trained.meta["labels"] = mapping.labels()
        trained.meta["crm_properties"] = {
            name: {crm: prop for crm in ("hubspot", "salesforce") if (prop := getattr(spec, crm))}
            for name, spec in mapping.custom.items()
        }
    trained.meta["training"]["suspected_leaks"] = leaks
    trained.meta["training"]["seconds"] = round(time.perf_counter() - started, 1)
    trained.save(out)
    return trained


CHUNK_ROWS = 500  # rows scored at a time: the progress bar moves, and only a chunk's leads are held


def _chunks(table: LabelledTable, scorer: str) -> Iterator[slice]:
    """The table's chunks, behind a progress bar naming the scorer (`evaluate` runs several)."""
    return (
        slice(start, start + CHUNK_ROWS)
        for start in progress(f"scoring {scorer}")(range(0, len(table.frame), CHUNK_ROWS))
    )


def rules_results(table: LabelledTable, config: ScoringConfig) -> Iterator[ScoreResult]:
    """Zero-label mode: the rules scorer alone, the AI propensity held at its neutral prior, so
    each score is the one production writes for the lead when no LLM answers."""
    neutral = fallback("zero-label mode: rules only")
    for rows in _chunks(table, RULES):
        for lead in tabular.leads_from_frame(table.frame.iloc[rows], table.mapping):
            yield blend_score(lead, evaluate_rules(lead, config), neutral, config)


def model_results(
    table: LabelledTable, model: TrainedModel, config: ScoringConfig, name: str = "model"
) -> Iterator[ScoreResult]:
    """The model's scores and reasons, as workers write them (statuses the config caps included)."""
    shown = table.shown.get("status")  # spelled as a lead's status is: the config's caps match it
    for rows in _chunks(table, name):
        results = model_scoring.score_frame(
            model,
            table.features.iloc[rows],
            table.shown.iloc[rows],
            threads=0,  # every core: the per-lead contributions are most of the time
            config=config,
        )
        statuses = [None] * len(results) if shown is None else [
            status if isinstance(status, str) else None for status in shown.iloc[rows]
        ]  # fmt: skip
        yield from model_scoring.capped_by_status(model, results, statuses, config)


@dataclass
class Written:
    """What a file's scorer wrote, row by row, without the details: a million rows' would fill
    gigabytes."""

    score: list[int] = field(default_factory=list)
    tier: list[str] = field(default_factory=list)
    reason: list[str] = field(default_factory=list)
    capped: int = 0  # rows whose score a status cap lowered

    @classmethod
    def of(cls, results: Iterable[ScoreResult]) -> Written:
        written = cls()
        for result in results:
            written.score.append(result.score)
            written.tier.append(result.tier)
            written.reason.append(result.reason)
            written.capped += "capped_from" in result.details
        return written


def require_model_kinds(model: TrainedModel, table: LabelledTable) -> None:
    """Refuses a mapping that reads one of the model's features as another kind: that is wrong data,
    not a gap (a yes/no column read as categorical gives values the model never saw, on every row).
    And one that maps none of them: every row would get the same score."""
    if not set(model.kinds) & set(table.features.columns):
        raise TableError(
            f"the mapping gives no column for any of model {model.version}'s features "
            f"({', '.join(model.kinds)}), so every row would score the same: map them as in its training"
        )
    kinds = table.mapping.feature_kinds()
    differ = [name for name, kind in model.kinds.items() if kinds.get(name, kind) != kind]
    if differ:
        raise TableError(
            f"model {model.version} learned "
            f"{', '.join(f'{name} as {model.kinds[name]}' for name in differ)}, but the mapping reads "
            f"{', '.join(f'{name} as {kinds[name]}' for name in differ)}: make the mapping's kind match "
            "the model's"
        )


def unmapped_features(model: TrainedModel, table: LabelledTable) -> str | None:
    """A warning when the mapping leaves some of the model's features out: they score as missing,
    which the model tolerates but ranks less well with."""
    absent = [name for name in model.kinds if name not in table.features.columns]
    if not absent:
        return None
    return (
        f"the mapping gives no column for {len(absent)} of the model's {len(model.kinds)} features "
        f"({', '.join(absent)}): they are scored as missing, which ranks less well"
    )


MAX_UNSEEN_NAMED = 3


def unseen_values(model: TrainedModel, table: LabelledTable) -> str | None:
    """A warning when rows hold a category the model never saw in training: it knows nothing of
    such a value (not even that it is missing), so a new status or source is ranked by the rest."""
    columns = table.mapping.columns()
    found = []
    for name, rows in model.unseen(table.features).items():
        counts = table.frame[columns[name]][rows].value_counts()  # as the file spells them
        named = ", ".join(repr(value) for value in counts.index[:MAX_UNSEEN_NAMED])
        more = f" and {len(counts) - MAX_UNSEEN_NAMED} more" if len(counts) > MAX_UNSEEN_NAMED else ""
        held = int(counts.sum())
        found.append(f"{columns[name]} in {held} row{'s' if held > 1 else ''} ({named}{more})")
    if not found:
        return None
    return (
        f"values model {model.version} never saw in training: {'; '.join(found)}. They score as "
        "unknown to it; retrain once they are common"
    )


def _warn(message: str | None) -> None:
    if message:
        print(f"warning: {message}", file=sys.stderr)


def score_file(
    data: Path, mapping_path: Path, out: Path, config: ScoringConfig, model_dir: Path | None
) -> dict[str, int]:
    """Writes the scored file; returns how many rows landed in each tier."""
    table = load_table(data, mapping_path, None, need_label=False)
    model = TrainedModel.load(model_dir) if model_dir else None
    if model is not None:
        require_model_kinds(model, table)
        _warn(unmapped_features(model, table))
        _warn(unseen_values(model, table))
    written = Written.of(
        model_results(table, model, config, model_name(model_dir)) if model else rules_results(table, config)
    )
    out = Path(out)
    if streams_into(out):
        with out.open("w", encoding="utf-8", newline="") as handle:
            _write_scored(handle, table, written)
        return _landed(written)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `out` then renamed, so a failed write leaves the last file whole; created anew
    # (O_EXCL), so a link planted at a name it could have in a shared folder is never followed.
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, before the rename)
        "w",
        encoding="utf-8",
        newline="",
        dir=out.parent,
        prefix=f".{out.name}.",
        suffix=".partial",
        delete=False,
    )
    partial = Path(handle.name)
    try:
        with handle:
            _write_scored(handle, table, written)
        partial.chmod(0o666 & ~_umask())  # as a file opened the usual way would be, not 0600
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return _landed(written)


# The shell's own streams, which a redirection may point at a regular file: written into, never
# replaced (as root, a rename would replace /dev/stdout itself).
_STANDARD_STREAM = re.compile(r"/dev/(?:stdout|stderr|fd/\d+)|/proc/(?:self|thread-self|\d+)/fd/\d+")


def streams_into(out: Path) -> bool:
    """Whether `--out` names a stream to write into, never a file to replace: the shell's stdout
    however spelt (/dev/stdout, ../dev/stdout, /proc/self/fd/1), or a pipe or device."""
    path = "/" + os.path.normpath(Path(out).absolute()).lstrip("/")
    return bool(_STANDARD_STREAM.fullmatch(path)) or (out.exists() and not out.is_file())


def _write_scored(handle, table: LabelledTable, written: Written) -> None:
    pd.DataFrame({
        table.mapping.id: table.frame[table.mapping.id],
        "score": written.score,
        "tier": written.tier,
        "reason": written.reason,
    }).to_csv(handle, index=False)  # fmt: skip


def _landed(written: Written) -> dict[str, int]:
    landed = Counter(written.tier)
    return {tier: landed[tier] for tier in TIER_NAMES}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


Curves = dict[str, tuple[np.ndarray, np.ndarray, list[str]]]  # scorer -> (labels, score / 100, tiers)


def evaluate(
    data: Path | None, mapping_path: Path | None, label: str | None, out: Path, config: ScoringConfig,
    model_dirs: list[Path], store=None, min_age_days: float = 30.0, snapshot: str = "first",
) -> dict:  # fmt: skip
    """Every scorer side by side: on a labelled file, the rules and each model; with the store, the
    scores the workers wrote, against the outcomes it captured. Metrics JSON, Markdown, plots."""
    from workers import report

    scorers: dict[str, dict] = {}
    notes: list[str] = []
    curves: Curves = {}
    summary: dict = {
        "data": {},
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scoring_config": config.version,  # its rules, and the statuses whose caps bind a model too
    }
    if data is not None:
        table = load_table(data, mapping_path, label, need_label=True)
        notes += [f"`{table.source['file']}`: {warning}." for warning in table.warnings]
        curves.update(_file_scorers(table, config, model_dirs, scorers, notes))
        summary["data"] = table.source
    if store is not None:
        from workers.store_data import store_summary

        summary["store"] = store_summary(store, min_age_days)
        live, timing = _live_scorers(store, min_age_days, snapshot, config, scorers, notes)
        summary["live"] = {"snapshot": snapshot, "min_age_days": min_age_days, "time_to_convert": timing}
        curves.update(live)
    if not curves:
        notes.append(
            "No scorer can be ranked yet: that takes scored leads of both outcomes, and a lead counts, "
            f"converted or not, once it was first scored over {min_age_days:g} days ago (run "
            "`leadscore outcomes sync`, or lower --min-age-days). The holdout and rep feedback are above."
        )
    for name, (y, p, tiers) in curves.items():
        scorers[name].update({
            "leads": int(len(y)), "base_rate": round(float(y.mean()), 4),
            **classification_metrics(y, p), "tiers": tier_table(y, tiers),
            "conversions_reached": dict(zip([f"{share:.0%}" for share in GAINS_SHARES],
                                            conversions_reached(y, p), strict=True)),
        })  # fmt: skip
        if not scorers[name]["tiers"][0]["leads"]:  # as the terminal says it too
            notes.append(f"`{name}`: {said_of_tier_a(scorers[name]['tiers'], scorers[name]['base_rate'])}.")
    first = next(iter(scorers.values()), {})  # the file's rules, or else the first live scorer
    summary.update(rows=first.get("leads"), base_rate=first.get("base_rate"), scorers=scorers, notes=notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    report.write(out, summary, curves, cumulative_gains)
    return summary


def _file_scorers(
    table: LabelledTable, config: ScoringConfig, model_dirs: list[Path], scorers: dict, notes: list[str]
) -> Curves:
    """The rules and each model, scoring the same labelled file."""
    written = {RULES: Written.of(rules_results(table, config))}
    scorers[RULES] = {"scale": POINTS}
    names = [model_name(directory) for directory in model_dirs]
    for directory, name in zip(model_dirs, names, strict=True):
        model = TrainedModel.load(directory)
        require_model_kinds(model, table)
        if names.count(name) > 1 or name == RULES:
            name = f"model {model.version}"
        notes.append(f"`{name}` is model {model.version}, from `{directory}`.")
        written[name] = Written.of(model_results(table, model, config, name))
        for warning in (unmapped_features(model, table), unseen_values(model, table)):
            if warning:
                _warn(warning)
                notes.append(f"`{name}`: {warning}.")
        in_sample = _in_sample(model, table)
        if in_sample:
            _warn(f"{name}: {in_sample}")
            notes.append(f"`{name}` {in_sample}")
        if leaks := model.meta.get("training", {}).get("suspected_leaks"):
            notes.append(
                f"`{name}` learned from {_leaks_said(leaks)}, which `train` found looks recorded after or "
                "near the outcome: its numbers read the team's disposition of a lead as much as the lead, "
                "and fresh leads, which have none yet, rank worse."
            )
        scorers[name] = {
            "scale": PROBABILITY,
            "in_sample": in_sample is not None,  # its numbers here are optimistic
            "capped": written[name].capped,
            "cross_validation": model.meta.get("candidates"),
            "calibration": model.meta["calibration"],
            "kept_candidate": model.meta.get("model"),
            "calibrated_oof_ece": model.meta.get("expected", {}).get("ece"),
        }
    return {
        name: (table.y, np.array(rows.score, dtype=float) / 100, rows.tier) for name, rows in written.items()
    }


def model_name(directory: Path) -> str:
    """A model's name as a scorer: its directory's, which the team chose; versions of models trained
    on one file differ only in the time they were trained."""
    return Path(os.path.abspath(directory)).name


def _live_scorers(
    store, min_age_days: float, snapshot: str, config: ScoringConfig, scorers: dict, notes: list[str]
) -> tuple[Curves, dict]:
    """The scores the workers wrote, per scorer, against the outcomes the store captured; for a
    rules+LLM scorer, what the LLM's part adds to the rules on the same leads; and how long the
    leads took to convert (`store_data.time_to_convert`)."""
    from workers.store_data import WITHOUT_LLM, live_scorers

    curves: Curves = {}
    live, unpaired, timing = live_scorers(store, min_age_days, config.tiers, snapshot)
    notes += [
        f"`{name}` is not compared with the rules alone: {count} of its leads' scores keep no blend to take "
        "the LLM's part from"
        for name, count in unpaired.items()
    ]
    for name, (y, p, tiers, scale) in live.items():
        if y.min() == y.max():
            if not name.endswith(WITHOUT_LLM):  # its scorer's note says it
                notes.append(
                    f"`{name}`: all {len(y)} leads with an outcome so far "
                    f"{'converted' if y[0] else 'did not convert'}; there is no ranking to measure yet."
                )
            continue
        scorers[name] = {"min_age_days": min_age_days, "scale": scale}
        curves[name] = (y, p, tiers)
        blended = name.removesuffix(f" {WITHOUT_LLM}")
        if blended != name:
            scorers[blended]["llm_adds"] = paired_auc_difference(y, curves[blended][1], p)
    return curves, timing


def _in_sample(model: TrainedModel, table: LabelledTable) -> str | None:
    """Whether the model learned from leads of this file (by id; for artifacts that did not keep
    them, whether it is the very file), said with the honest figure: numbers on leads a model was
    trained on are optimistic."""
    honest = f"optimistic; its cross-validated ROC AUC is {_cv_auc(model)}."
    if model.trained_on is None:
        if model.meta.get("training", {}).get("sha256") != table.source["sha256"]:
            return None
        return f"was trained on this very file, so its numbers here are in-sample and {honest}"
    seen = int(np.isin(lead_digests(table.frame[table.mapping.id]), model.trained_on).sum())
    if not seen:
        return None
    leads = len(table.frame)
    return f"was trained on {seen} of these {leads} leads ({seen / leads:.0%}), so its numbers are {honest}"


def _leaks_said(leaks: list[dict]) -> str:
    return ", ".join(f"{leak['feature']} (alone ROC AUC {leak['roc_auc']:.3f})" for leak in leaks)


def _cv_auc(model: TrainedModel) -> str:
    candidate = (model.meta.get("candidates") or {}).get(model.meta.get("model"), {})
    return f"{candidate.get('cv_auc_mean', float('nan')):.4f}"
