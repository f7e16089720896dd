"""Trained scorers: candidates compared by cross-validation, the winner calibrated and saved.

A model artifact is a directory: `model.joblib` (estimator, calibrator and version) and `model.json`
(version, features, categories, metrics, training window) — readable without loading the
pickle. Artifacts are code (joblib); load only ones you trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from integration.errors import TableError, UserError
from workers.config import Tiers, value_key
from workers.evaluation import classification_metrics, expected_calibration_error, tier_table
from workers.tabular import DIRECTION_SIGNS, LLM_FEATURE, Direction, Kind

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
MISSING = "(missing)"
FOLDS = 5
SEED = 0
# n_jobs=1: the data are small, other processes share the cores, and a model predicts inside RQ's
# forked work horses, where an OpenMP thread pool started in the parent must not be relied on.
# 400 slow-learning trees of up to 31 leaves, each seeing 40% of the features, leaves of 5 leads or
# more, and categorical splits of one value against the rest (LightGBM's sorted many-vs-many
# partitions overfit a few thousand leads; min_data_per_group and cat_smooth only bind a categorical
# of more than 64 values): chosen by cross-validation on the X Education file (README, Performance,
# "The model's ROC AUC"). On a small store the same cross-validation decides whether they or the
# logistic regression serve.
LIGHTGBM_PARAMS = dict(
    n_estimators=400, learning_rate=0.02, num_leaves=31, min_child_samples=5, subsample=0.8,
    subsample_freq=1, colsample_bytree=0.4, reg_lambda=0.0, max_cat_to_onehot=64, min_data_per_group=5,
    cat_smooth=10, n_jobs=1, verbose=-1, random_state=SEED, deterministic=True, force_row_wise=True,
)  # fmt: skip
LOGISTIC_C = 1.0
RARE_CATEGORY_MIN = 20  # one-hot levels rarer than this are pooled (logistic regression)

Progress = Callable[[Iterable], Iterable]


def _no_progress(items: Iterable) -> Iterable:
    return items


def monotone_constraints(kinds: dict[str, Kind], monotone: dict[str, Direction] | None) -> dict:
    """LightGBM's parameters for the features kept in order, one entry per feature in training order;
    no parameters at all when there are none. LightGBM's "advanced" method keeps the same guarantee
    with fewer needless limits on the other splits than its default. A constraint on a categorical is
    refused here, since LightGBM would abort the whole process on it."""
    if not monotone:
        return {}
    categorical = [name for name in monotone if kinds.get(name) == "categorical"]
    if categorical:
        raise ValueError(f"cannot keep the categorical feature(s) {', '.join(categorical)} in order")
    return {
        "monotone_constraints": [DIRECTION_SIGNS.get(monotone.get(name), 0) for name in kinds],
        "monotone_constraints_method": "advanced",
    }


def _lightgbm(kinds: dict[str, Kind], monotone: dict[str, Direction] | None):
    import lightgbm

    return lightgbm.LGBMClassifier(**LIGHTGBM_PARAMS, **monotone_constraints(kinds, monotone))


def _logistic_regression(kinds: dict[str, Kind], monotone: dict[str, Direction] | None):
    """Does not enforce [monotone]: only the gradient-boosting candidate keeps features in order."""
    categorical = [n for n, k in kinds.items() if k == "categorical"]
    numeric = [n for n, k in kinds.items() if k != "categorical"]
    numbers = make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        FunctionTransformer(_signed_log1p, feature_names_out="one-to-one"),
        StandardScaler(),
    )
    encode = OneHotEncoder(
        handle_unknown="infrequent_if_exist", min_frequency=RARE_CATEGORY_MIN, sparse_output=False
    )
    prepare = ColumnTransformer([("categorical", encode, categorical), ("numeric", numbers, numeric)])
    return make_pipeline(prepare, LogisticRegression(C=LOGISTIC_C, max_iter=5000))


def _signed_log1p(x):
    return np.sign(x) * np.log1p(np.abs(x))


CANDIDATES = {"logistic_regression": _logistic_regression, "lightgbm": _lightgbm}


# A categorical feature with nearly a value of its own a lead (an id, an email, a name) teaches a model
# nothing that carries to a new lead, and model.json would keep every one of its values.
IDENTIFIER_SHARE = 0.9
IDENTIFIER_MIN_VALUES = 50


def identifier_like(frame: pd.DataFrame, kinds: dict[str, Kind]) -> dict[str, tuple[int, int]]:
    """Categorical features most leads have a value of their own for: (distinct values, leads with one)."""
    found = {}
    for name, kind in kinds.items():
        if kind != "categorical" or name not in frame.columns:
            continue
        values = frame[name].dropna().astype(str)
        distinct = values.nunique()
        if distinct >= IDENTIFIER_MIN_VALUES and distinct > IDENTIFIER_SHARE * len(values):
            found[name] = (distinct, len(values))
    return found


# A categorical feature recorded after or near the outcome (a status the sales team sets as it works a
# lead, a reason it was closed) ranks leads nearly by itself, or has a common value nearly every lead of
# which converts, or nearly none does: cross-validation then reads the team's disposition, and a fresh
# lead, which has none yet, scores far worse than it says. Warned about, not refused: a team that
# scores leads it has already worked may mean it.
LEAK_ROC_AUC = 0.9  # the feature alone, each lead scored by its value's conversion rate
LEAK_POOLED = 10  # values of fewer leads are ranked as one: their own rates would rank leads by chance
LEAK_MIN_LEADS = 50  # a value this common...
LEAK_HIGH, LEAK_LOW = 0.97, 0.01  # ...converting at least / at most this often
# ...where the base rate is this many times further from it: at a 1% base rate, a value converting at
# 1% is what chance gives (B2B lead-to-won rates are often that low), not a telling one.
LEAK_BASE_FACTOR = 10


@dataclass
class SuspectedLeak:
    feature: str
    roc_auc: float  # of the feature alone
    # (value, leads, conversion rate): the common values converting near-always or near-never, most
    # leads first; of a feature that ranks by itself without one, its highest- and lowest-converting
    levels: list[tuple[str, int, float]]


def suspected_leaks(
    frame: pd.DataFrame, y: np.ndarray, kinds: dict[str, Kind], spelled: pd.DataFrame | None = None
) -> list[SuspectedLeak]:
    """Categorical features that look recorded after or near the outcome (`LEAK_*`), missing counted as
    a value of its own, as the model counts it. Each ranks leads by its values' conversion rates, rare
    values pooled, so a feature of many values a few leads each does not rank by fitting them. A few
    array passes a feature: cheap on hundreds of thousands of rows. Values are named as `spelled`
    gives them (default: as in `frame`)."""
    y = np.asarray(y, dtype=float)
    base = float(y.mean()) if len(y) else 0.0
    telling_low = base >= LEAK_LOW * LEAK_BASE_FACTOR
    telling_high = 1 - base >= (1 - LEAK_HIGH) * LEAK_BASE_FACTOR
    found = []
    for name, kind in kinds.items():
        if kind != "categorical" or name not in frame.columns:
            continue
        codes, values = pd.factorize(frame[name], use_na_sentinel=True)
        codes = np.where(codes < 0, len(values), codes)  # missing: a value of its own
        leads = np.bincount(codes, minlength=len(values) + 1)
        converted = np.bincount(codes, weights=y, minlength=len(values) + 1)
        rate = converted / np.maximum(leads, 1)
        rare = leads < LEAK_POOLED
        ranked = np.where(rare, converted[rare].sum() / max(leads[rare].sum(), 1), rate)
        auc = _roc_auc_of_values(ranked, converted, leads - converted)
        near_certain = (leads >= LEAK_MIN_LEADS) & (
            (telling_high & (rate >= LEAK_HIGH - 1e-12)) | (telling_low & (rate <= LEAK_LOW + 1e-12))
        )
        if near_certain.any():
            shown = sorted(np.flatnonzero(near_certain), key=lambda code: -leads[code])
        elif auc >= LEAK_ROC_AUC:  # ranks by itself without a near-certain value: its highest and lowest
            common = np.flatnonzero(leads >= min(LEAK_MIN_LEADS, leads.max()))
            shown = [common[np.argmax(rate[common])], common[np.argmin(rate[common])]]
        else:
            continue
        source = (spelled if spelled is not None else frame)[name].to_numpy()
        levels = [
            (MISSING if code == len(values) else str(source[np.argmax(codes == code)]),  # its first row's
             int(leads[code]), float(rate[code]))
            for code in shown
        ]  # fmt: skip
        found.append(SuspectedLeak(name, auc, levels))
    return found


def _roc_auc_of_values(score: np.ndarray, converted: np.ndarray, other: np.ndarray) -> float:
    """ROC AUC of leads scored by their value's `score`, from each value's counts of converted and other
    leads: what `roc_auc_score` gives for every lead, without sorting them."""
    _, tied = np.unique(score, return_inverse=True)  # ascending, equal scores as one
    converted, other = np.bincount(tied, weights=converted), np.bincount(tied, weights=other)
    below = np.cumsum(other) - other
    return float((converted * (below + other / 2)).sum() / (converted.sum() * other.sum()))


def categories_of(frame: pd.DataFrame, kinds: dict[str, Kind]) -> dict[str, list[str]]:
    return {
        name: sorted(frame[name].dropna().astype(str).unique().tolist())
        for name, kind in kinds.items()
        if kind == "categorical"
    }


def design_matrix(
    frame: pd.DataFrame, kinds: dict[str, Kind], categories: dict[str, list[str]]
) -> pd.DataFrame:
    """Features in training order; categoricals as pandas categories fixed at training time
    (missing is a level of its own, an unseen value is NaN), the rest as floats."""
    columns = {}
    for name, kind in kinds.items():
        values = frame[name] if name in frame else pd.Series(np.nan, index=frame.index)
        if kind == "categorical":
            known = [MISSING, *categories[name]]
            text = as_trained(values.astype("object").where(values.notna(), MISSING).astype(str), known)
            columns[name] = pd.Categorical(text.where(text.isin(known)), categories=known)  # unseen: NaN
        else:
            columns[name] = pd.to_numeric(values, errors="coerce").astype(float)
    return pd.DataFrame(columns, index=frame.index)


def as_trained(values: pd.Series, known: list[str]) -> pd.Series:
    """Categorical values as training spelled them, where they differ only by spaces, hyphens and
    underscores: a model trained on an export ("direct traffic", HubSpot's label) reads the API's
    value ("direct_traffic") as that category, not as one it never saw."""
    other = ~values.isin(known)
    if not other.any():
        return values
    by_key: dict[str, str] = {}
    for category in known:
        by_key.setdefault(value_key(category), category)
    respelled = values[other].map(lambda value: by_key.get(value_key(value), value), na_action="ignore")
    return values.where(~other, respelled)


def require_folds(y: np.ndarray, where: str, fix: str = "", folds: int = FOLDS) -> None:
    """Refuses labels with fewer than `folds` rows of either outcome, before any work: stratified
    cross-validation puts each outcome in every fold, and a fold without one has no ROC AUC."""
    converted = int(np.sum(y))
    fewest = min(converted, len(y) - converted)
    if fewest < folds:
        outcome = "converted lead" if fewest == converted else "lead that did not convert"
        outcome = outcome if fewest == 1 else outcome.replace("lead", "leads", 1)
        raise TableError(
            f"only {fewest} {outcome} {where}: cross-validation in {folds} folds needs at least {folds} of "
            f"each outcome{fix}"
        )


@dataclass
class CandidateResult:
    name: str
    oof: np.ndarray
    fold_auc: list[float]
    fit_seconds: float

    @property
    def auc_mean(self) -> float:
        return float(np.mean(self.fold_auc))

    def summary(self, y: np.ndarray) -> dict:
        return {
            "cv_auc_mean": round(self.auc_mean, 4),
            "cv_auc_sd": round(float(np.std(self.fold_auc)), 4),
            "fit_seconds_per_fold": round(self.fit_seconds, 3),
            **{f"oof_{k}": v for k, v in classification_metrics(y, self.oof).items()},
        }


def cross_validate(
    X: pd.DataFrame,
    y: np.ndarray,
    kinds: dict[str, Kind],
    folds: int = FOLDS,
    progress: Progress = _no_progress,
    monotone: dict[str, Direction] | None = None,
) -> dict[str, CandidateResult]:
    """Out-of-fold probabilities of every candidate on the same stratified folds."""
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED).split(X, y))
    results = {}
    steps = [(name, i) for name in CANDIDATES for i in range(folds)]
    oof = {name: np.zeros(len(y)) for name in CANDIDATES}
    aucs: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    seconds: dict[str, float] = dict.fromkeys(CANDIDATES, 0.0)
    for name, i in progress(steps):
        train_idx, test_idx = splits[i]
        started = time.perf_counter()
        estimator = CANDIDATES[name](kinds, monotone).fit(X.iloc[train_idx], y[train_idx])
        seconds[name] += time.perf_counter() - started
        oof[name][test_idx] = estimator.predict_proba(X.iloc[test_idx])[:, 1]
        aucs[name].append(float(roc_auc_score(y[test_idx], oof[name][test_idx])))
    for name in CANDIDATES:
        results[name] = CandidateResult(name, oof[name], aucs[name], seconds[name] / folds)
    return results


class Calibrator:
    """Maps raw probabilities to calibrated ones: Platt (sigmoid on the logit) or isotonic."""

    def __init__(self, method: str):
        self.method = method
        self._fit = None

    def fit(self, raw: np.ndarray, y: np.ndarray) -> Calibrator:
        if self.method == "isotonic":
            self._fit = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(raw, y)
        else:
            self._fit = LogisticRegression(C=1e6).fit(_logit(raw).reshape(-1, 1), y)
        return self

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.method == "isotonic":
            return np.clip(self._fit.predict(raw), 0.0, 1.0)
        return self._fit.predict_proba(_logit(raw).reshape(-1, 1))[:, 1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def choose_calibration(
    oof: np.ndarray, y: np.ndarray, folds: int = FOLDS
) -> tuple[str, dict[str, dict], np.ndarray]:
    """Sigmoid or isotonic, whichever has the lower cross-validated log loss on the winner's
    out-of-fold scores: a proper scoring rule, so an isotonic map that buys ECE with ties
    (and ranking) does not win on ECE alone. Also returns the chosen method's cross-validated
    probabilities: what the model's scores on unseen leads are expected to look like."""
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED + 1).split(oof, y))
    scores = {"none": {"log_loss": _log_loss(y, oof), "ece": round(expected_calibration_error(y, oof), 4)}}
    calibrated = {}
    for method in ("sigmoid", "isotonic"):
        calibrated[method] = np.zeros(len(y))
        for fit_idx, test_idx in splits:
            calibrated[method][test_idx] = Calibrator(method).fit(oof[fit_idx], y[fit_idx])(oof[test_idx])
        scores[method] = {
            "log_loss": _log_loss(y, calibrated[method]),
            "ece": round(expected_calibration_error(y, calibrated[method]), 4),
        }
    best = min(("sigmoid", "isotonic"), key=lambda m: scores[m]["log_loss"])
    return best, scores, calibrated[best]


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return round(float(log_loss(y, np.clip(p, 1e-6, 1 - 1e-6))), 4)


def score_of(probability):
    """The 0-100 score written for a calibrated probability (or an array of them)."""
    return np.clip(np.round(np.asarray(probability) * 100), 0, 100).astype(int)


def expected_performance(y: np.ndarray, probabilities: np.ndarray, tiers: Tiers) -> dict:
    """Metrics of out-of-fold, calibrated scores (rounded to 0-100 as written): the honest
    estimate for leads the model has not seen."""
    scores = score_of(probabilities)
    return {
        **classification_metrics(y, scores / 100),
        "tiers": tier_table(y, [tiers.tier_for(int(s)) for s in scores]),
    }


class ModelArtifactError(UserError):
    """A model directory `TrainedModel.load` refuses: not one, damaged, or of another format."""


@dataclass
class TrainedModel:
    estimator: object
    calibrator: Calibrator
    kinds: dict[str, Kind]
    categories: dict[str, list[str]]
    meta: dict = field(default_factory=dict)
    trained_on: np.ndarray | None = None  # `lead_digests` of the leads it learned from (None: not kept)

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def uses_llm(self) -> bool:
        return LLM_FEATURE in self.kinds

    def matrix(self, frame: pd.DataFrame) -> pd.DataFrame:
        return design_matrix(frame, self.kinds, self.categories)

    def unseen(self, frame: pd.DataFrame) -> dict[str, pd.Series]:
        """Per categorical feature of a feature frame (values normalised as `tabular` does), a mask of
        the rows whose value training never saw (a new status or source): the model knows nothing of
        it, not even that it is missing. The same test as `design_matrix`, without building it."""
        masks = {}
        for name, kind in self.kinds.items():
            if kind != "categorical" or name not in frame.columns:
                continue
            values, known = frame[name], [MISSING, *self.categories[name]]
            mask = values.notna() & ~as_trained(values.astype(str), known).isin(known)
            if mask.any():
                masks[name] = mask
        return masks

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated conversion probabilities."""
        return self.calibrator(self.estimator.predict_proba(self.matrix(frame))[:, 1])

    def explain(self, frame: pd.DataFrame, threads: int = 1) -> tuple[np.ndarray, pd.DataFrame]:
        """Calibrated probabilities and per-lead, per-feature contributions to the raw log-odds
        (LightGBM's pred_contrib, on `threads` threads, 0 for every core; for other estimators, the
        change in log-odds when the feature is set to missing), from one design matrix."""
        X = self.matrix(frame)
        raw = self.estimator.predict_proba(X)[:, 1]
        return self.calibrator(raw), self._contributions(X, raw, frame.index, threads)

    def _contributions(self, X: pd.DataFrame, raw: np.ndarray, index: pd.Index, threads: int) -> pd.DataFrame:
        booster = getattr(self.estimator, "booster_", None)
        if booster is not None:
            values = self.estimator.predict(X, pred_contrib=True, num_threads=threads)[:, : len(self.kinds)]
            return pd.DataFrame(values, columns=list(self.kinds), index=index)
        base = _logit(raw)
        out = {}
        for name, kind in self.kinds.items():
            blank = X.copy()
            blank[name] = MISSING if kind == "categorical" else np.nan
            if kind == "categorical":
                blank[name] = pd.Categorical(blank[name], categories=X[name].cat.categories)
            out[name] = base - _logit(self.estimator.predict_proba(blank)[:, 1])
        return pd.DataFrame(out, index=index)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        # Features are positional for the estimator: keep their order as a list, not a sorted object.
        features = [{"name": name, "kind": kind} for name, kind in self.kinds.items()]
        meta = {**self.meta, "features": features, "categories": self.categories}
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"  # may fail: before writing
        directory.mkdir(parents=True, exist_ok=True)
        parts = {"estimator": self.estimator, "calibrator": self.calibrator, "version": self.version,
                 "trained_on": self.trained_on}  # fmt: skip
        joblib.dump(parts, directory / "model.joblib")
        (directory / "model.json").write_text(text)
        return directory

    @classmethod
    def load(cls, directory: Path) -> TrainedModel:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "model.json").read_text())
            parts = joblib.load(directory / "model.joblib")
        except NotADirectoryError:
            raise ModelArtifactError(
                f"{directory} is a file: point at the directory `leadscore train` wrote (model.json and "
                "model.joblib)"
            ) from None
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{directory} is not a leadscore model: {exc.filename} is missing (make one with "
                "`leadscore train`)"
            ) from None
        except Exception as exc:  # json's and pickle's many ways of failing on a damaged file
            raise _damaged(directory, exc) from None
        if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ModelArtifactError(f"{directory} holds model format {found}, expected {ARTIFACT_FORMAT}")
        try:
            kinds = {feature["name"]: feature["kind"] for feature in meta.pop("features")}
            categories = meta.pop("categories")
            trained_on = parts.get("trained_on")  # artifacts saved before it was kept: None
            model = cls(parts["estimator"], parts["calibrator"], kinds, categories, meta, trained_on)
            made_by = parts.get("version", model.version)  # artifacts saved before it was kept there
        except (KeyError, TypeError, AttributeError) as exc:
            raise _damaged(directory, exc) from None
        if made_by != model.version:
            raise ModelArtifactError(
                f"{directory} mixes two models: model.json is {model.version}, model.joblib is {made_by}: "
                "copy the artifact directory of one `leadscore train` over whole"
            )
        try:  # one lead with nothing known: at start, not at the first batch, if it cannot score at all
            model.explain(pd.DataFrame([dict.fromkeys(kinds)]))
        except Exception as exc:
            said = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelArtifactError(
                f"{directory} cannot score a lead ({type(exc).__name__}: {said}): the {len(kinds)} "
                "features its model.json lists are not those its model.joblib was fitted on, or this "
                "release's libraries cannot run it (trained with "
                f"{_libraries_said(meta.get('libraries'))}): train it again"
            ) from None
        if _other_libraries(meta.get("libraries")):
            log.warning(
                "%s was trained with %s, and runs with %s: train it again if its scores look wrong",
                directory, _libraries_said(meta["libraries"]), _libraries_said(library_versions()),
            )  # fmt: skip
        return model


def library_versions() -> dict[str, str]:
    """The versions a model's estimator and calibrator were pickled by, kept in model.json: a pickle
    holds numpy's and pandas' objects too (one made under numpy 2 does not load under numpy 1)."""
    import lightgbm
    import sklearn

    return {"lightgbm": lightgbm.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "scikit-learn": sklearn.__version__}  # fmt: skip


def _other_libraries(recorded: dict[str, str] | None) -> bool:
    """Whether a library a model records ran another version than now (an artifact of an older
    release records fewer: those it does not record are not compared)."""
    running = library_versions()
    return bool(recorded) and any(running.get(name) != version for name, version in recorded.items())


def _libraries_said(libraries: dict[str, str] | None) -> str:
    if not libraries:
        return "unrecorded library versions"
    return ", ".join(f"{name} {version}" for name, version in sorted(libraries.items()))


def lead_digests(ids) -> np.ndarray:
    """Eight bytes of a hash of each lead id, sorted: enough to tell whether a lead was among those a
    model learned from, without keeping the ids themselves in the artifact."""
    digests = b"".join(hashlib.blake2b(str(i).strip().encode(), digest_size=8).digest() for i in ids)
    return np.sort(np.frombuffer(digests, dtype=np.uint64))


def _damaged(directory: Path, exc: Exception) -> ModelArtifactError:
    return ModelArtifactError(
        f"{directory} holds a damaged model ({type(exc).__name__}: {exc}): train it again, or copy the "
        "artifact directory over whole"
    )


def train(
    frame: pd.DataFrame,
    y: np.ndarray,
    kinds: dict[str, Kind],
    *,
    source: dict,
    tiers: Tiers,
    folds: int = FOLDS,
    progress: Progress = _no_progress,
    monotone: dict[str, Direction] | None = None,
) -> TrainedModel:
    """Compare the candidates by cross-validation, refit the best on all rows, calibrate it on its
    out-of-fold scores. `source` describes the training data (file, rows, window) for the artifact;
    `monotone` the features kept in order (the mapping's [monotone])."""
    categories = categories_of(frame, kinds)
    X = design_matrix(frame, kinds, categories)
    results = cross_validate(X, y, kinds, folds, progress, monotone)
    best = max(results.values(), key=lambda r: r.auc_mean)
    method, calibration_scores, calibrated_oof = choose_calibration(best.oof, y, folds)
    calibrator = Calibrator(method).fit(best.oof, y)
    estimator = CANDIDATES[best.name](kinds, monotone).fit(X, y)
    kept_in_order = (monotone or {}) if best.name == "lightgbm" else {}  # the logistic regression cannot
    created = datetime.now(UTC)
    identity = {"source": source, "kinds": kinds, "model": best.name}
    if kept_in_order:  # versions of models without [monotone] stay as they were
        identity["monotone"] = kept_in_order
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": f"{created:%Y%m%dT%H%M%SZ}-{best.name}-{digest}",
        "libraries": library_versions(),
        "created_at": created.isoformat(timespec="seconds"),
        "model": best.name,
        "calibration": method,
        "calibration_cv": calibration_scores,
        "monotone": kept_in_order,
        "tiers": tiers.model_dump(),
        "expected": expected_performance(y, calibrated_oof, tiers),
        "candidates": {name: r.summary(y) for name, r in results.items()},
        "training": {
            **source,
            "rows": int(len(y)),
            "positive_rate": round(float(y.mean()), 4),
            "folds": folds,
        },
        "base_rate": float(y.mean()),
    }
    return TrainedModel(estimator, calibrator, dict(kinds), categories, meta)
