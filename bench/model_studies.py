"""Model studies: the README's "what else was tried" numbers, reproducible on the shipped file.

Every study scores LightGBM (the shipped settings unless it says otherwise) by the same three seeds of
stratified 5-fold cross-validation on the X Education file (the learning curve's 2 and 20 folds and
one forward split aside), as the mean over seeds of the pooled out-of-fold ROC AUC, so the rows can be
compared with each other:

- the shipped settings, and how often a holdout-sized sample (2,720 leads) of their out-of-fold
  scores reaches ROC AUC 0.985;
- LightGBM variants: without the mapping's [monotone], its default many-vs-many categorical splits,
  extra-trees, DART, path smoothing;
- extra features: the team's own rules (fixtures/data/x_education_rules.toml) as four sub-scores or
  one score; `Lead Number` (an identifier, not shipped), also on a forward split by it;
- fewer features: without `Tags` and `Lead Quality` (what a brand-new lead looks like);
- the learning curve: 2-fold (training on half the file) against 20-fold (95%).

CatBoost, target encoding and the rank-averaged blends quoted beside these in the README were
one-off studies (CatBoost is not a dependency); this script does not repeat them.

Run: .venv/bin/python bench/model_studies.py [--data ../shared/data/leads_train.csv] (about 2.5 min)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightgbm
import numpy as np
import pandas as pd
from harness import ROOT, machine, save, table
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from workers import model as wm
from workers import tabular
from workers.config import load_config
from workers.offline import load_table
from workers.rules import COMPONENTS, evaluate_rules

MAPPING = ROOT / "fixtures" / "data" / "x_education_mapping.toml"
TEAM_RULES = ROOT / "fixtures" / "data" / "x_education_rules.toml"
SEEDS = (0, 1, 2)
HOLDOUT_ROWS = 2720
TARGET = 0.985


def lightgbm_model(X: pd.DataFrame, monotone: dict[str, str], **params) -> lightgbm.LGBMClassifier:
    """The shipped LightGBM (with the mapping's [monotone]) for these columns, `params` changed."""
    kinds = {c: "categorical" if isinstance(X[c].dtype, pd.CategoricalDtype) else "numeric" for c in X}
    constraints = wm.monotone_constraints(kinds, monotone)
    return lightgbm.LGBMClassifier(**{**wm.LIGHTGBM_PARAMS, **constraints, **params})


def out_of_fold(
    X: pd.DataFrame, y: np.ndarray, seed: int, monotone: dict[str, str], folds: int = 5, **params
) -> np.ndarray:
    scores = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        model = lightgbm_model(X, monotone, **params).fit(X.iloc[train], y[train])
        scores[test] = model.predict_proba(X.iloc[test])[:, 1]
    return scores


def cv_auc(X: pd.DataFrame, y: np.ndarray, monotone: dict[str, str], folds: int = 5, **params) -> float:
    return float(
        np.mean([roc_auc_score(y, out_of_fold(X, y, seed, monotone, folds, **params)) for seed in SEEDS])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "leads_train.csv")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/model_studies.json)")
    args = parser.parse_args()
    started, began = machine(), time.perf_counter()
    data = load_table(args.data, MAPPING, None, need_label=True)
    kinds, y = data.mapping.feature_kinds(), data.y
    monotone = data.mapping.monotone_for(kinds)
    X = wm.design_matrix(data.features, kinds, wm.categories_of(data.features, kinds))
    config = load_config(TEAM_RULES)
    rules = pd.DataFrame(
        [
            evaluate_rules(lead, config).scores()
            for lead in tabular.leads_from_frame(data.frame, data.mapping)
        ],
        index=X.index,
    )
    weights = config.weights.normalised()

    rows: list[dict] = []

    def cv(features: pd.DataFrame, **params) -> float:
        return cv_auc(features, y, monotone, **params)

    def study(name: str, auc: float, note: str = "") -> None:
        rows.append({"study": name, "roc_auc": round(auc, 4), "note": note})
        print(f"  {name}: {auc:.4f} {note}", flush=True)

    shipped = [out_of_fold(X, y, seed, monotone) for seed in SEEDS]
    rng = np.random.default_rng(0)
    samples = [
        roc_auc_score(y[pick], scores[pick])
        for scores in shipped
        for pick in (rng.choice(len(y), HOLDOUT_ROWS, replace=False) for _ in range(400))
    ]
    reach = float(np.mean(np.array(samples) >= TARGET))
    study("shipped settings", float(np.mean([roc_auc_score(y, s) for s in shipped])),
          f"{reach:.0%} of {HOLDOUT_ROWS}-lead samples reach {TARGET}")  # fmt: skip
    study("without [monotone]", cv_auc(X, y, {}), "(time on site free to lower a score)")
    study("many-vs-many categorical splits", cv(X, max_cat_to_onehot=4), "(LightGBM's default)")
    study("extra-trees", cv(X, extra_trees=True))
    study("extra-trees, 1,500 trees", cv(X, extra_trees=True, n_estimators=1500))
    dart = dict(boosting_type="dart", n_estimators=300, learning_rate=0.1, drop_rate=0.1)
    study("DART (300 trees, lr 0.1)", cv(X, **dart))
    study("path smoothing 10", cv(X, path_smooth=10))
    study("path smoothing 50", cv(X, path_smooth=50))
    study(
        "+ team rules, 4 sub-scores",
        cv(pd.concat([X, rules[list(COMPONENTS)].add_prefix("rules_")], axis=1)),
    )
    composite = sum(weights[name] * rules[name] for name in COMPONENTS)
    study("+ team rules, 1 score", cv(X.assign(rules_score=composite)))
    number = pd.to_numeric(data.frame["Lead Number"], errors="coerce").to_numpy()
    study("+ Lead Number", cv(X.assign(lead_number=number)), "(an identifier: not shipped)")
    order = np.argsort(number, kind="stable")
    earliest, latest = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
    for name, features in (("", X), (" + Lead Number", X.assign(lead_number=number))):
        model = lightgbm_model(features, monotone).fit(features.iloc[earliest], y[earliest])
        forward = roc_auc_score(y[latest], model.predict_proba(features.iloc[latest])[:, 1])
        study(f"forward split{name}", forward, "(one split: trained on the earliest 80% by number)")
    study("without Tags and Lead Quality", cv(X.drop(columns=["status", "rating"])))
    study("2-fold (trains on 50%)", cv(X, folds=2))
    study("20-fold (trains on 95%)", cv(X, folds=20))

    print(table(rows, ["study", "roc_auc", "note"]))
    print(f"{time.perf_counter() - began:.0f} s")
    results = {
        "seeds": list(SEEDS),
        "holdout_rows": HOLDOUT_ROWS,
        "share_reaching_target": reach,
        "studies": rows,
    }
    print(f"results: {save('model_studies', args, results, args.out, started)}")


if __name__ == "__main__":
    main()
