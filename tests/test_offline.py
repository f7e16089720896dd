"""`leadscore train`, `score-file` and `evaluate` on a slice of the public lead dataset
(fixtures/data/leads_slice.csv, mapped by fixtures/data/x_education_mapping.toml)."""

from __future__ import annotations

import codecs
import csv
import fcntl
import itertools
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lightgbm
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import sklearn
from sqlalchemy import make_url

from integration.cli import main
from integration.lead import Lead
from integration.settings import get_settings
from tests.conftest import EACH_STORE, FIXTURES, PORTAL_ID
from workers import model_scoring, offline, report, tabular
from workers.blend import blend_score, blend_weights, with_provenance
from workers.config import load_config
from workers.evaluation import (
    calibration_bins,
    classification_metrics,
    conversions_reached,
    cumulative_gains,
    expected_calibration_error,
    paired_auc_difference,
    rate_difference,
    tier_table,
)
from workers.model import TrainedModel, library_versions, monotone_constraints, suspected_leaks
from workers.propensity import NEUTRAL, PropensityResult, fallback
from workers.rules import evaluate_rules
from workers.store import Feedback, LeadFact, ScoreRecord, Store
from workers.store_data import training_rows

DATA = FIXTURES / "data" / "leads_slice.csv"
MAPPING = FIXTURES / "data" / "x_education_mapping.toml"
PNG = b"\x89PNG\r\n\x1a\n"
FILE_ARGS = ["--data", str(DATA), "--mapping", str(MAPPING)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "x-education"
    assert main(["train", "--data", str(DATA), "--mapping", str(MAPPING), "--out", str(out)]) == 0
    return out


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_compares_candidates_by_cross_validation_and_keeps_the_better(trained):
    meta = json.loads((trained / "model.json").read_text())

    assert set(meta["candidates"]) == {"logistic_regression", "lightgbm"}
    best = max(meta["candidates"], key=lambda name: meta["candidates"][name]["cv_auc_mean"])
    assert meta["model"] == best
    assert meta["candidates"][best]["cv_auc_mean"] > 0.9  # 500 rows; the full file gives 0.9849
    assert meta["calibration"] in ("sigmoid", "isotonic")
    chosen = meta["calibration"]
    other = "isotonic" if chosen == "sigmoid" else "sigmoid"
    assert meta["calibration_cv"][chosen]["log_loss"] <= meta["calibration_cv"][other]["log_loss"]
    assert meta["training"]["rows"] == 500 and meta["training"]["file"] == "leads_slice.csv"
    assert meta["training"]["positive_rate"] == 0.37
    assert [f["name"] for f in meta["features"]][:3] == ["source", "source_detail", "status"]
    assert meta["tiers"] == {"A": 80, "B": 50, "C": 20}
    assert meta["version"].endswith(f"-{meta['model']}-" + meta["version"].rsplit("-", 1)[1])


def _scores_as_time_on_site_grows(model: TrainedModel) -> np.ndarray:
    """Each lead of the slice scored at 0 s to 40 min on the site: one row a lead, one column a time."""
    features = offline.load_table(DATA, MAPPING, None, need_label=True).features
    times = [0, 30, 60, 120, 300, 600, 900, 1200, 1800, 2400]
    return np.column_stack([model.predict(features.assign(time_on_site_s=float(t))) for t in times])


def test_a_trained_model_keeps_the_mappings_monotone_features_in_order(trained, tmp_path):
    model = TrainedModel.load(trained)
    free = offline.train_from_file(DATA, _without_monotone(tmp_path), None, tmp_path / "free")

    assert model.meta["model"] == "lightgbm"
    assert model.meta["monotone"] == {"time_on_site_s": "increasing"}
    assert (np.diff(_scores_as_time_on_site_grows(model), axis=1) >= 0).all()
    assert free.meta["monotone"] == {}
    assert (np.diff(_scores_as_time_on_site_grows(free), axis=1) < 0).any()  # what [monotone] prevents


def _without_monotone(tmp_path: Path) -> Path:
    kept = '[monotone]\ntime_on_site_s = "increasing"\n'
    assert kept in MAPPING.read_text()
    mapping = tmp_path / "free.toml"
    mapping.write_text(MAPPING.read_text().replace(kept, ""))
    return mapping


def test_monotone_directions_become_lightgbms_signs_in_training_order():
    mapping = tabular.Mapping.model_validate(
        {"id": "id", "fields": {"source": "Source", "email_opted_out": "Opted out", "visits": "Visits"},
         "monotone": {"visits": "increasing", "email_opted_out": "decreasing"}}
    )  # fmt: skip
    kinds = mapping.feature_kinds()

    assert monotone_constraints(kinds, mapping.monotone_for(kinds)) == {
        "monotone_constraints": [0, -1, 1],
        "monotone_constraints_method": "advanced",
    }
    assert monotone_constraints(kinds, {}) == {}
    with pytest.raises(ValueError, match="cannot keep the categorical feature"):
        monotone_constraints(kinds, {"source": "increasing"})  # LightGBM would abort the process


def test_monotone_is_reported_as_not_enforced_when_the_logistic_regression_wins(tmp_path, capsys):
    rng = np.random.default_rng(0)  # one number, linear in the log-odds: the logistic regression's home
    x = rng.normal(size=300)
    won = (rng.random(300) < 1 / (1 + np.exp(-2 * x))).astype(int)
    data = _write(tmp_path, pd.DataFrame({"id": range(300), "x": x.round(3), "won": won}))
    mapping = tmp_path / "linear.toml"
    mapping.write_text('id = "id"\nlabel = "won"\n[custom]\nx = { column = "x", kind = "numeric" }\n'
                       '[monotone]\nx = "increasing"\n')  # fmt: skip

    assert _train(tmp_path, data, mapping) == 0
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["model"] == "logistic_regression" and meta["monotone"] == {}
    assert capsys.readouterr().err == (
        "warning: [monotone] is not enforced: logistic_regression ranked best, and only lightgbm keeps "
        "features in order\n"
    )


def test_a_categorical_column_like_an_email_is_left_out_of_the_model_and_named(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    won = (rng.random(300) < 1 / (1 + np.exp(-2 * x))).astype(int)
    frame = pd.DataFrame({"id": range(300), "x": x.round(3), "won": won,
                          "email": [f"lead{i}@example.com" for i in range(300)],
                          "plan": rng.choice(["free", "team", "enterprise"], size=300)})  # fmt: skip
    data = _write(tmp_path, frame)
    mapping = tmp_path / "emails.toml"
    mapping.write_text('id = "id"\nlabel = "won"\n[custom]\nx = { column = "x", kind = "numeric" }\n'
                       'email = { column = "email" }\nplan = { column = "plan" }\n')  # fmt: skip

    assert _train(tmp_path, data, mapping) == 0

    saved = (tmp_path / "m" / "model.json").read_text()
    assert [f["name"] for f in json.loads(saved)["features"]] == ["x", "plan"] and "@example.com" not in saved
    assert capsys.readouterr().err.startswith(
        "warning: not learned from: email (300 values in 300 leads), nearly one value a lead, like an id, an "
        "email or a name: a model learns nothing from it that carries to a new lead, and model.json would "
        "keep every value\n"
    )
    only_emails = tmp_path / "only.toml"
    only_emails.write_text('id = "id"\nlabel = "won"\n[custom]\nemail = { column = "email" }\n')
    assert _train(tmp_path / "again", data, only_emails) == 2
    assert capsys.readouterr().err.endswith(
        "every feature is like an id, an email or a name: map columns that many leads share values of\n"
    )


def test_train_warns_of_tags_as_recorded_near_the_outcome_and_model_json_keeps_it(tmp_path, capsys):
    assert _train(tmp_path, DATA) == 0

    assert capsys.readouterr().err == (
        "warning: feature status (column 'Tags') looks recorded after or near the outcome: alone it ranks "
        "leads at ROC AUC 0.908; 'Will revert after reading the email': 105 leads, 95.2% converted; "
        "'Ringing': 72 leads, 4.2% converted. Is it known when a lead is scored? If the team fills it in as "
        "it works a lead, the model learns that disposition, not the lead, and ranks fresh leads, which have "
        "none yet, worse than its cross-validation says: for a model of fresh leads, leave it out of the "
        "mapping\n"
    )  # a warning, not a refusal: the model is saved
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"]["suspected_leaks"] == [{
        "feature": "status", "column": "Tags", "roc_auc": 0.908, "values": [
            {"value": "Will revert after reading the email", "leads": 105, "conversion_rate": 0.9524},
            {"value": "Ringing", "leads": 72, "conversion_rate": 0.0417},
        ],
    }]  # fmt: skip


def test_the_first_touch_mapping_leaves_out_what_the_team_records_after_contact_and_warns_of_nothing(
    tmp_path, capsys
):
    first_touch = FIXTURES / "data" / "x_education_first_touch_mapping.toml"
    shipped = tabular.load_mapping(MAPPING)
    assert tabular.load_mapping(first_touch) == shipped.model_copy(
        update={"fields": {k: v for k, v in shipped.fields.items() if v not in ("Tags", "Lead Quality")}}
    )  # identical but for them

    assert _train(tmp_path, DATA, first_touch) == 0

    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"]["suspected_leaks"] == []


def _one_value_among_others(leads: int, converted: int, value: object = "closed") -> pd.DataFrame:
    """`leads` leads of `value`, `converted` of them converted, among 600 others of two values converting
    at 40% (nothing near-certain, and far from ranking leads by themselves)."""
    others = pd.DataFrame({"status": ["open"] * 300 + ["new"] * 300, "won": ([1] * 120 + [0] * 180) * 2})
    ours = pd.DataFrame({"status": [value] * leads, "won": [1] * converted + [0] * (leads - converted)})
    return pd.concat([others, ours], ignore_index=True)


@pytest.mark.parametrize(
    ("leads", "converted", "warned"),
    [(49, 49, False), (50, 50, True), (49, 0, False), (50, 0, True), (100, 97, True), (100, 96, False),
     (100, 1, True), (100, 2, False)],
)  # fmt: skip
def test_a_value_is_suspect_from_50_leads_converting_at_97_percent_or_more_or_1_percent_or_less(
    leads, converted, warned
):
    frame = _one_value_among_others(leads, converted)
    found = suspected_leaks(frame, frame["won"].to_numpy(), {"status": "categorical"})

    if not warned:
        assert found == []
        return
    [leak] = found
    assert leak.levels == [("closed", leads, converted / leads)] and leak.roc_auc < 0.9


@pytest.mark.parametrize("base_rate", [0.005, 0.01, 0.99])
def test_a_value_as_rare_or_common_a_converter_as_every_lead_is_no_suspect(base_rate):
    """At a 1% base rate (B2B lead-to-won), a value converting at 1% or less is what chance gives."""
    rng = np.random.default_rng(7)
    won = (rng.random(20_000) < base_rate).astype(int)
    frame = pd.DataFrame({"status": rng.choice(["a", "b", "c", "d", "e"], size=20_000), "won": won})

    assert suspected_leaks(frame, won, {"status": "categorical"}) == []


def test_a_missing_value_is_a_value_of_its_own_and_named_as_one():
    frame = _one_value_among_others(60, 0, value=np.nan)
    [leak] = suspected_leaks(frame, frame["won"].to_numpy(), {"status": "categorical", "won": "numeric"})
    assert leak.feature == "status" and leak.levels == [("(missing)", 60, 0.0)]


@pytest.mark.parametrize(("hot", "warned"), [(95, True), (90, True), (85, False)])
def test_a_feature_whose_values_alone_rank_leads_at_0_9_or_more_is_suspect(hot, warned):
    frame = pd.DataFrame({"status": ["hot"] * 100 + ["cold"] * 100,
                          "won": [1] * hot + [0] * (100 - hot) + [1] * (100 - hot) + [0] * hot})  # fmt: skip
    found = suspected_leaks(frame, frame["won"].to_numpy(), {"status": "categorical"})

    if not warned:
        assert found == []
        return
    [leak] = found  # nothing near-certain: the highest- and lowest-converting values are named
    assert leak.roc_auc == pytest.approx(hot / 100)
    assert leak.levels == [("hot", 100, hot / 100), ("cold", 100, (100 - hot) / 100)]


def test_values_of_a_few_leads_each_are_ranked_as_one_not_by_their_own_rates():
    frame = pd.DataFrame({"status": [f"rep {i // 2}" for i in range(400)], "won": [1, 1, 0, 0] * 100})
    assert suspected_leaks(frame, frame["won"].to_numpy(), {"status": "categorical"}) == []  # each value's
    # own rate would rank every lead right (ROC AUC 1.0), by fitting two leads a value


def test_a_saved_model_predicts_exactly_as_the_one_trained(tmp_path):
    table = offline.load_table(DATA, MAPPING, None, need_label=True)
    fresh = offline.train_from_file(DATA, MAPPING, None, tmp_path / "m")
    loaded = TrainedModel.load(tmp_path / "m")

    assert list(loaded.kinds) == list(fresh.kinds)  # the estimator reads features by position
    assert np.array_equal(loaded.predict(table.features), fresh.predict(table.features))


def test_a_model_trained_on_labels_reads_the_crms_values_as_the_categories_they_spell(trained):
    """A HubSpot export gives "Direct Traffic" where the API gives DIRECT_TRAFFIC (lower-cased as
    features are): one category, not one the model never saw."""
    table = offline.load_table(DATA, MAPPING, None, need_label=False)
    model = TrainedModel.load(trained)
    spelled = table.features[table.features["source"] == "direct traffic"].head(5)
    assert len(spelled) == 5
    as_the_api_gives = spelled.assign(source="direct_traffic")

    assert model.unseen(as_the_api_gives) == {}
    assert np.array_equal(model.predict(as_the_api_gives), model.predict(spelled))
    unknown = model.unseen(spelled.assign(source="direct mail"))  # a value training never saw stays so
    assert list(unknown) == ["source"] and unknown["source"].all()


def test_a_model_loaded_by_other_library_versions_than_trained_it_says_so(trained, tmp_path, caplog):
    meta = json.loads((trained / "model.json").read_text())
    assert meta["libraries"] == library_versions()
    older = tmp_path / "older"
    shutil.copytree(trained, older)
    (older / "model.json").write_text(
        json.dumps({**meta, "libraries": {"lightgbm": "4.0.0", "scikit-learn": "1.3.0"}})
    )

    TrainedModel.load(older)

    [said] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == (
        f"{older} was trained with lightgbm 4.0.0, scikit-learn 1.3.0, and runs with "
        f"lightgbm {lightgbm.__version__}, numpy {np.__version__}, pandas {pd.__version__}, scikit-learn "
        f"{sklearn.__version__}: train it again if its scores look wrong"
    )


def test_a_model_of_an_older_release_recording_fewer_libraries_loads_without_a_word(
    trained, tmp_path, caplog
):
    """Only the libraries a model records are compared: numpy and pandas were not recorded before."""
    meta = json.loads((trained / "model.json").read_text())
    older = tmp_path / "older"
    shutil.copytree(trained, older)
    recorded = {name: meta["libraries"][name] for name in ("lightgbm", "scikit-learn")}
    (older / "model.json").write_text(json.dumps({**meta, "libraries": recorded}))

    TrainedModel.load(older)

    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


def test_score_file_without_a_model_uses_the_rules_alone(tmp_path, capsys):
    out = tmp_path / "rules.csv"
    assert main(["score-file", "--data", str(DATA), "--mapping", str(MAPPING), "--out", str(out)]) == 0

    scored = rows(out)
    assert len(scored) == 500
    assert scored[:3] == [
        {"Prospect ID": "7927b2df-8bba-4d29-b9a2-b6e0beafe620", "score": "45", "tier": "C",
         "reason": "Unemployed; Olark Chat"},  # below 50: what pulled it down, not that it can be reached
        {"Prospect ID": "82cb5fb0-2d97-4a39-a630-ab5fe2e7f18c", "score": "48", "tier": "C",
         "reason": "Unemployed; Google"},  # occupations and sources the B2B rules do not know
        {"Prospect ID": "e60a54bc-0816-430e-a99a-019a8b5a27e5", "score": "49", "tier": "C",
         "reason": "Working Professional at fintech; Google"},
    ]  # fmt: skip
    # The file has no contact columns: its leads are taken as reachable, not as "No email or phone".
    config, table = load_config(), offline.load_table(DATA, MAPPING, None, need_label=True)
    rules = evaluate_rules(tabular.leads_from_frame(table.frame.head(1), table.mapping)[0], config).scores()
    weights = blend_weights(config)  # the propensity share held at the neutral prior, as live with no LLM
    composite = sum(weight * rules.get(name, NEUTRAL) for name, weight in weights.items())
    assert int(scored[0]["score"]) == round(100 * composite)
    printed = capsys.readouterr().out
    assert "scored 500 rows with the rules" in printed and "(tiers: A 0%, B 0%, C 99%, D 1%)" in printed
    # B2B SaaS defaults on B2C course leads: the command says the rules do not separate them.
    assert "warning: 99% of rows land in tier C, so the rules barely separate" in printed


TEAM_RULES = FIXTURES / "data" / "x_education_rules.toml"


@pytest.fixture
def team_rules(monkeypatch):
    """The rules X Education's own sales team would write (its tags, sources and lead quality)."""
    monkeypatch.setenv("SCORING_CONFIG_PATH", str(TEAM_RULES))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_score_file_with_the_teams_own_rules_separates_its_leads(team_rules, tmp_path, capsys):
    out = tmp_path / "rules.csv"
    assert main(["score-file", *FILE_ARGS, "--out", str(out)]) == 0

    assert rows(out)[:4] == [
        {"Prospect ID": "7927b2df-8bba-4d29-b9a2-b6e0beafe620", "score": "34", "tier": "D",
         "reason": "Wants other courses; Unemployed"},
        {"Prospect ID": "82cb5fb0-2d97-4a39-a630-ab5fe2e7f18c", "score": "49", "tier": "C",
         "reason": "No status yet; Unemployed"},  # no tag: nobody has spoken to them
        {"Prospect ID": "e60a54bc-0816-430e-a99a-019a8b5a27e5", "score": "60", "tier": "B",
         "reason": "Working Professional; Engaged and reachable"},
        {"Prospect ID": "59e722da-edff-43d9-af61-f5c8bcc986c4", "score": "45", "tier": "C",
         "reason": "Owner: low relevance, Busy when called; Unemployed"},
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert "(tiers: A 12%, B 9%, C 52%, D 27%)" in printed and "warning" not in printed

    report = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--out", str(report)]) == 0
    rules = json.loads((report / "metrics.json").read_text())["scorers"]["rules"]
    assert rules["roc_auc"] == 0.82  # the B2B defaults: 0.56 on the full file
    assert rules["tiers"][0]["lift"] >= 2


def test_score_file_with_a_model_names_each_leads_drivers(trained, tmp_path):
    out = tmp_path / "model.csv"
    assert main(["score-file", *FILE_ARGS, "--model", str(trained), "--out", str(out)]) == 0

    scored = pd.read_csv(out)
    truth = pd.read_csv(DATA)["Converted"]
    assert list(scored.columns) == ["Prospect ID", "score", "tier", "reason"]
    assert scored["Prospect ID"].tolist() == pd.read_csv(DATA)["Prospect ID"].tolist()
    assert scored["score"].between(0, 100).all()
    tiers = model_scoring.DEFAULT_MODEL_TIERS
    assert (scored["tier"] == [tiers.tier_for(s) for s in scored["score"]]).all()
    assert scored["reason"].str.len().max() <= 90
    labels = ("Status: ", "Rating: ", "Seconds on site: ", "Last activity: ", "Last notable activity: ")
    assert scored["reason"].str.startswith(labels).mean() > 0.8  # the strong signals lead the reasons
    status = scored["reason"].str.extract(r"^Status: ([^;]+)")[0]
    named = status.notna() & (status != "not set")
    assert named.sum() > 50
    spelled = pd.read_csv(DATA)["Tags"].str.split().str.join(" ")  # as the file spells them, spaced once
    assert (status[named] == spelled[named]).all()
    converted_in_a = truth[scored["tier"] == "A"].mean()
    assert converted_in_a >= 2 * truth.mean()


def test_the_rules_score_a_file_a_chunk_of_leads_at_a_time_and_keep_only_what_they_write(monkeypatch):
    """A million rows' leads and score details at once took 6 GB; a chunk's are all that is held."""
    table = offline.load_table(DATA, MAPPING, None, need_label=False)
    whole = [(r.score, r.tier, r.reason) for r in offline.rules_results(table, load_config())]
    monkeypatch.setattr(offline, "CHUNK_ROWS", 64)
    built = []
    leads_from_frame = tabular.leads_from_frame
    monkeypatch.setattr(tabular, "leads_from_frame", lambda frame, mapping: built.append(len(frame))
                        or leads_from_frame(frame, mapping))  # fmt: skip

    written = offline.Written.of(offline.rules_results(table, load_config()))

    assert built == [64] * 7 + [52]  # 500 rows
    assert list(zip(written.score, written.tier, written.reason, strict=True)) == whole


def test_a_model_scores_a_file_in_chunks_exactly_as_in_one_pass(trained, monkeypatch):
    table = offline.load_table(DATA, MAPPING, None, need_label=False)
    model = TrainedModel.load(trained)
    monkeypatch.setattr(offline, "CHUNK_ROWS", 64)  # 500 rows: 8 chunks, the last one short

    assert list(offline.model_results(table, model, load_config())) == model_scoring.score_frame(
        model, table.features, table.shown, config=load_config()
    )  # the default config caps no status of this file


def test_a_status_the_config_caps_caps_the_models_score_as_it_caps_the_rules(trained, tmp_path, team_rules):
    out = tmp_path / "capped.csv"
    assert main(["score-file", *FILE_ARGS, "--model", str(trained), "--out", str(out)]) == 0

    table = offline.load_table(DATA, MAPPING, None, need_label=False)
    model = TrainedModel.load(trained)
    caps = load_config(TEAM_RULES).source_stage  # the team caps tags it has written off
    # Its caps of 25 and 39 keep a lead in the rules' tier D, 54 in C: under the model's tiers (A 80,
    # B 50, C 20) a lead stays at or below 19 and 49.
    ceiling_of = {25: 19, 39: 19, 54: 49}
    expected, bound = [], []
    # the model's own scores, its reasons in the team's labels ("Wants other courses"), as score-file writes
    uncapped = model_scoring.score_frame(model, table.features, table.shown, config=load_config(TEAM_RULES))
    for result, tag in zip(uncapped, table.frame["Tags"], strict=True):
        rule = caps.status(tag)
        if rule is not None and rule.cap is not None and result.score > ceiling_of[rule.cap]:
            bound.append(tag)
            ceiling = ceiling_of[rule.cap]
            expected.append([ceiling, "D" if ceiling == 19 else "C", rule.label])
        else:
            expected.append([result.score, result.tier, result.reason])  # as the model scores it

    assert pd.read_csv(out)[["score", "tier", "reason"]].values.tolist() == expected
    assert Counter(bound) == {"Lost to EINS": 12, "invalid number": 1, "Graduation in progress": 1,
                              "Interested in other courses": 1}  # fmt: skip

    assert main(["evaluate", *FILE_ARGS, "--model", str(trained), "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert (metrics["scoring_config"], metrics["scorers"]["x-education"]["capped"]) == (
        "x-education-team-1",
        15,
    )
    assert "- `x-education`: 15 leads capped by their status, as scoring config `x-education-team-1` " in (
        (tmp_path / "report" / "report.md").read_text()
    )


def test_score_file_shows_a_progress_bar_on_a_terminal_only(trained, tmp_path, capsys):
    command = [sys.executable, "-m", "integration.cli", "score-file", *FILE_ARGS, "--model", str(trained)]
    terminal, its_end = pty.openpty()
    fcntl.ioctl(its_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws in its width
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    subprocess.run([*command, "--out", str(tmp_path / "a.csv")], **quiet, stderr=its_end, cwd=FIXTURES.parent,
                   check=True, timeout=120)  # fmt: skip
    os.close(its_end)
    shown = b""
    while chunk := _read_or_nothing(terminal):
        shown += chunk
    os.close(terminal)
    assert re.search(rb"\rscoring x-education: +\d+%\|.*\| \d+/1 ", shown)  # 500 rows: one chunk

    assert main(["score-file", *FILE_ARGS, "--model", str(trained), "--out", str(tmp_path / "b.csv")]) == 0
    assert "scoring" not in capsys.readouterr().err  # no bar in CI logs


def _read_or_nothing(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # Linux reports EIO once the writing side has closed
        return b""


def test_evaluate_says_how_many_leads_a_model_learned_from_in_a_reshuffled_copy(trained, tmp_path, capsys):
    frame = _slice().sort_values("Converted", ascending=False).head(250)
    frame.iloc[200:, frame.columns.get_loc("Prospect ID")] = [f"new-{n}" for n in range(50)]  # unseen
    data = _write(tmp_path, frame)

    assert main(["evaluate", "--data", str(data), "--mapping", str(MAPPING), "--model", str(trained),
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip

    _version, note, leaks, *_ = json.loads((tmp_path / "report" / "metrics.json").read_text())["notes"]
    assert "which `train` found looks recorded after or near the outcome" in leaks
    said = "was trained on 200 of these 250 leads (80%), so its numbers are optimistic; its cross-validated"
    assert said in note and said in capsys.readouterr().err


def test_evaluate_tells_a_model_saved_without_its_leads_by_the_very_file(trained, tmp_path):
    older = TrainedModel.load(trained)
    older.trained_on = None  # as artifacts saved before the leads' digests were kept
    older.save(tmp_path / "older")

    assert main(["evaluate", *FILE_ARGS, "--model", str(tmp_path / "older"), "--out", str(tmp_path)]) == 0

    _version, note, *_ = json.loads((tmp_path / "metrics.json").read_text())["notes"]
    assert "was trained on this very file, so its numbers here are in-sample and optimistic" in note


def test_evaluate_reports_every_scorer_side_by_side(trained, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--model", str(trained), "--out", str(out)]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 500 and metrics["base_rate"] == 0.37
    names = list(metrics["scorers"])
    assert names == ["rules", "x-education"]  # a model by its directory's name
    for scorer in metrics["scorers"].values():
        assert set(scorer) >= {"roc_auc", "pr_auc", "brier", "ece", "tiers"}
        assert [row["tier"] for row in scorer["tiers"]] == ["A", "B", "C", "D"]
        assert sum(row["leads"] for row in scorer["tiers"]) == 500
    rules = metrics["scorers"]["rules"]  # no randomness in the rules: their numbers on this slice are exact
    assert {k: rules[k] for k in ("roc_auc", "pr_auc", "brier", "ece")} == {
        "roc_auc": 0.5366, "pr_auc": 0.3816, "brier": 0.2419, "ece": 0.0993,
    }  # fmt: skip
    assert [row["leads"] for row in rules["tiers"]] == [0, 0, 496, 4]
    assert metrics["scorers"][names[1]]["roc_auc"] > rules["roc_auc"]
    version, in_sample, leaks, tier_a = metrics["notes"]
    assert version == f"`x-education` is model {TrainedModel.load(trained).version}, from `{trained}`."
    assert "trained on 500 of these 500 leads (100%), so its numbers are optimistic" in in_sample
    assert leaks == (
        "`x-education` learned from status (alone ROC AUC 0.908), which `train` found looks recorded "
        "after or near the outcome: its numbers read the team's disposition of a lead as much as the lead, "
        "and fresh leads, which have none yet, rank worse."
    )
    assert tier_a == "`rules`: tier A empty (no lead reaches its cut-off)."  # as the terminal says it
    for plot in ("roc.png", "calibration.png", "tiers.png", "gains.png"):
        assert (out / plot).read_bytes().startswith(PNG)
    report = (out / "report.md").read_text()
    assert "| rules |" in report and "](roc.png)" in report
    model = metrics["scorers"]["x-education"]
    assert f"\nBest at ranking leads: `x-education` (ROC AUC {model['roc_auc']:.4f}); tier A " in report
    assert "× the 37% base rate). It learned from some of these leads, so its numbers are optimistic (see " \
           "the notes).\n" in report  # fmt: skip
    assert "report:" in capsys.readouterr().out


def test_the_report_says_which_way_is_better_which_scorer_ranks_best_and_what_each_plot_shows(tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--out", str(out)]) == 0

    said = (out / "report.md").read_text()
    assert (
        "| scorer | leads | conversion rate | ROC AUC | PR AUC | Brier | ECE |\n"
        "|---|---|---|---|---|---|---|\n"
        "| rules | 500 | 37.0% | 0.5366 | 0.3816 | 0.2419 | 0.0993 |\n\n"
        "ROC AUC and PR AUC: higher is better (0.5 is chance for ROC AUC, the conversion rate for PR AUC); "
        "Brier and ECE: lower is better.\n\n"
        "Best at ranking leads: `rules` (ROC AUC 0.5366); tier A empty (no lead reaches its cut-off).\n"
    ) in said  # "conversion rate", not "converted", which the tier table counts
    reached = json.loads((out / "metrics.json").read_text())["scorers"]["rules"]["conversions_reached"]
    table = offline.load_table(DATA, MAPPING, None, need_label=True)
    scores = np.array(offline.Written.of(offline.rules_results(table, load_config())).score) / 100
    assert list(reached.values()) == conversions_reached(table.y, scores)  # the gains plot's own curve
    assert "| scorer | top 10% | top 20% | top 30% |\n|---|---|---|---|\n| rules | 8.8% | 19.4% | 31.0% |\n" \
           in said  # fmt: skip
    assert "![ROC curves of rules (ROC AUC rules 0.5366): true positive rate against false positive rate, " \
           "the diagonal being chance](roc.png)" in said  # fmt: skip
    alt = {png: text for text, png in re.findall(r"!\[([^]]*)\]\((\w+\.png)\)", said)}
    assert set(alt) == {"roc.png", "calibration.png", "tiers.png", "gains.png"}
    assert all("rules" in text and "diagonal" in text for png, text in alt.items() if png != "tiers.png")
    assert "overall conversion rate" in alt["tiers.png"]


def test_models_are_named_by_their_directories_and_each_progress_bar_by_its_scorer(
    trained, tmp_path, monkeypatch
):
    other = TrainedModel.load(trained)
    other.meta["version"] = "20260101T000000Z-lightgbm-other"
    other.save(tmp_path / "b" / "x-education")
    shutil.copytree(trained, tmp_path / "a" / "x-education")  # two directories of one name
    shutil.copytree(trained, tmp_path / "first-touch")
    bars = []
    monkeypatch.setattr(offline, "progress", lambda desc: bars.append(desc) or (lambda items: items))

    assert main(["evaluate", *FILE_ARGS, "--model", str(tmp_path / "a" / "x-education"), "--model",
                 str(tmp_path / "b" / "x-education"), "--model", str(tmp_path / "first-touch"), "--out",
                 str(tmp_path / "report")]) == 0  # fmt: skip

    version = TrainedModel.load(trained).version
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    names = ["rules", f"model {version}", "model 20260101T000000Z-lightgbm-other", "first-touch"]
    assert list(metrics["scorers"]) == names
    assert f"`first-touch` is model {version}, from `{tmp_path / 'first-touch'}`." in metrics["notes"]
    assert bars == [f"scoring {name}" for name in names]


def test_each_tier_gives_its_conversions_with_wilsons_interval_and_a_small_tier_is_flagged(tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--out", str(out)]) == 0

    tiers = json.loads((out / "metrics.json").read_text())["scorers"]["rules"]["tiers"]
    assert tiers[0] == {"tier": "A", "leads": 0, "share": 0.0, "conversion_rate": None, "lift": None,
                        "converted": 0, "ci95": None}  # fmt: skip
    assert tiers[3] == {"tier": "D", "leads": 4, "share": 0.008, "conversion_rate": 0.25, "lift": 0.68,
                        "converted": 1, "ci95": [0.0456, 0.6994]}  # fmt: skip
    report = (out / "report.md").read_text()
    assert "| rules | A | 0 | 0.0% | 0 | n/a | n/a | n/a |" in report  # missing, said in words
    assert "| rules | C | 496 | 99.2% | 184 | 37.1% | 33.0% to 41.4% | 1.00× |" in report
    assert "| rules | D | 4 | 0.8% | 1 | 25.0% | 4.6% to 69.9% | 0.68× |" in report
    assert "- `rules`: tier D (4 leads): fewer than 30 leads, so conversion and lift are rough; the 95% " \
           "interval says how rough." in report  # fmt: skip
    assert "too few outcomes" not in report  # 185 converted, 315 not


def test_a_scorer_with_few_conversions_is_flagged_as_too_few_to_rank(tmp_path):
    leads = pd.read_csv(DATA)
    few = pd.concat([leads[leads["Converted"] == 1].head(12), leads[leads["Converted"] == 0]])
    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(_write(tmp_path, few)), "--mapping", str(MAPPING), "--out",
                 str(out)]) == 0  # fmt: skip

    assert "- `rules`: 12 converted and 315 unconverted leads: too few outcomes to rank reliably (its ROC " \
           "AUC, PR AUC and curves want at least 20 of each)." in (out / "report.md").read_text()  # fmt: skip


def test_brier_and_ece_of_the_rules_are_said_to_measure_a_points_scale(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--model", str(trained), "--out", str(out)]) == 0

    scorers = json.loads((out / "metrics.json").read_text())["scorers"]
    assert [scorer["scale"] for scorer in scorers.values()] == ["points", "probability"]
    report = (out / "report.md").read_text()
    said = [line for line in report.split("## Tiers")[0].splitlines() if line.startswith("- ")]
    assert said == [  # the model's Brier and ECE stand as they are
        "- `rules`: the rules' 0 to 100 is a points scale, not a probability, so Brier and ECE measure it "
        "against a scale it was not built for; compare the rules by ROC AUC, PR AUC and tier lift."
    ]


def test_the_cross_validation_table_tells_uncalibrated_from_calibrated_ece(trained, tmp_path):
    out = tmp_path / "report"
    assert main(["evaluate", *FILE_ARGS, "--model", str(trained), "--out", str(out)]) == 0

    meta = json.loads((trained / "model.json").read_text())
    kept, other = meta["model"], ({"lightgbm", "logistic_regression"} - {meta["model"]}).pop()
    scorer = json.loads((out / "metrics.json").read_text())["scorers"]["x-education"]
    assert (scorer["kept_candidate"], scorer["calibrated_oof_ece"]) == (kept, meta["expected"]["ece"])
    report = (out / "report.md").read_text()
    assert "| candidate | CV ROC AUC | sd across folds | out-of-fold ECE, uncalibrated | out-of-fold ECE, " \
           f"{meta['calibration']}-calibrated |" in report  # fmt: skip
    k, o = meta["candidates"][kept], meta["candidates"][other]
    assert f"| {kept} (kept) | {k['cv_auc_mean']:.4f} | {k['cv_auc_sd']:.4f} | {k['oof_ece']:.4f} | " \
           f"{meta['expected']['ece']:.4f} |" in report  # fmt: skip
    assert f"| {other} | {o['cv_auc_mean']:.4f} | {o['cv_auc_sd']:.4f} | {o['oof_ece']:.4f} | n/a |" in report
    assert "(calibration: " not in report


# ---------------------------------------------------------------- bad input, each a clear error


def _write(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "leads.csv"
    frame.to_csv(path, index=False)
    return path


def _train(tmp_path: Path, data: Path, mapping: Path = MAPPING) -> int:
    return main(["train", "--data", str(data), "--mapping", str(mapping), "--out", str(tmp_path / "m")])


def _run(command: str, tmp_path: Path, data: Path, mapping: Path = MAPPING) -> int:
    out = tmp_path / ("scored.csv" if command == "score-file" else command)
    return main([command, "--data", str(data), "--mapping", str(mapping), "--out", str(out)])


@pytest.mark.parametrize("command", ["train", "score-file", "evaluate"])
def test_a_missing_column_is_named(tmp_path, capsys, command):
    data = _write(tmp_path, pd.read_csv(DATA, dtype=str).drop(columns=["Tags"]))

    assert _run(command, tmp_path, data) == 2
    err = capsys.readouterr().err
    named = "has no column 'Tags' that the mapping (or --label) names; its columns are: "
    assert err.startswith(f"leadscore {command}: {data} {named}")


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ({4: ""}, "label column 'Converted' is empty in 1 of 500 rows (first at line 6); "
                  "every row needs an outcome (1 = converted, 0 = not)"),
        ({0: "2", 1: "Maybe"}, "label column 'Converted' is not binary: found '2', 'Maybe' (first at "
                               "line 2); expected 1/0, true/false or yes/no"),
        ({row: "0" for row in range(500)},
         "label column 'Converted' holds only 0s: a model needs both outcomes"),
    ],
    ids=["empty", "not_binary", "one_outcome"],
)  # fmt: skip
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_bad_label_is_refused_with_what_to_fix(tmp_path, capsys, cells, message, command):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    for row, value in cells.items():
        frame.loc[row, "Converted"] = value

    assert _run(command, tmp_path, _write(tmp_path, frame)) == 2
    assert capsys.readouterr().err == f"leadscore {command}: {message}\n"


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_lead_on_two_rows_is_refused(tmp_path, capsys, command):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame.loc[7, "Prospect ID"] = frame.loc[2, "Prospect ID"]
    data = _write(tmp_path, frame)

    assert _run(command, tmp_path, data) == 2
    assert capsys.readouterr().err == (
        f"leadscore {command}: {data}: 1 row(s) repeat an earlier row's Prospect ID (first: "
        f"{frame.loc[2, 'Prospect ID']!r} on line 9): a lead on both sides of a cross-validation split, or "
        "counted twice, makes the numbers optimistic; keep one row per lead\n"
    )


def _with_created(tmp_path: Path, created: list[str]) -> tuple[Path, Path]:
    """The slice with a `Created` column, and the X Education mapping naming it."""
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False).assign(Created=created)
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        MAPPING.read_text().replace('label = "Converted"\n', 'label = "Converted"\ncreated = "Created"\n')
    )
    return _write(tmp_path, frame), mapping


def test_a_created_column_gives_a_file_trained_model_its_training_window(tmp_path):
    created = [f"2026-{1 + i % 9:02d}-{1 + i % 28:02d}T08:{i % 60:02d}:00Z" for i in range(500)]
    created[0], created[1], created[2] = "", "2025-12-31T23:15:00.000+0000", "2026-10-02 17:45"  # as exported
    data, mapping = _with_created(tmp_path, created)

    assert _train(tmp_path, data, mapping) == 0

    training = json.loads((tmp_path / "m" / "model.json").read_text())["training"]
    assert (training["from"], training["to"]) == ("2025-12-31T23:15:00+00:00", "2026-10-02T17:45:00+00:00")
    assert training["rows"] == 500


@pytest.mark.parametrize(
    ("every", "cells", "named"),
    [
        ("2026-03-01T10:00:00Z", {6: "last Tuesday"}, "'last Tuesday' at line 8"),
        ("05/11/2026 10:00", {3: "13/11/2026 10:00"}, "'05/11/2026 10:00' at line 2"),  # 5 Nov or 11 May?
    ],
    ids=["not_a_date", "day_month_order"],
)  # fmt: skip
def test_a_created_cell_that_is_not_an_iso_8601_date_is_named(tmp_path, capsys, every, cells, named):
    created = [every] * 500
    for row, cell in cells.items():
        created[row] = cell
    data, mapping = _with_created(tmp_path, created)

    assert _train(tmp_path, data, mapping) == 2
    assert capsys.readouterr().err == (
        f"leadscore train: created column 'Created' holds {named}, which is not an ISO 8601 date (use e.g. "
        "2026-11-02T09:30:00Z, as HubSpot and Salesforce export them)\n"
    )


def test_the_label_mapped_as_a_feature_is_refused(tmp_path, capsys):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        'id = "Prospect ID"\nlabel = "Converted"\n[fields]\nstatus = "Tags"\n'
        '[custom]\nleak = { column = "Converted" }\n'
    )

    assert _train(tmp_path, DATA, mapping) == 2
    assert capsys.readouterr().err == (
        "leadscore train: the label column 'Converted' is also mapped as leak: a model would learn the "
        "outcome from itself; map it only as the label\n"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["score-file", *FILE_ARGS, "--out", "{tmp}"], "argument --out: '{tmp}' is a directory: give a file"),
        (["train", "--data", "{tmp}", "--mapping", str(MAPPING), "--out", "{tmp}/m"],
         "argument --data: '{tmp}' is a directory: give a file"),
        (["evaluate", *FILE_ARGS, "--mapping", "{tmp}", "--out", "{tmp}/r"],
         "argument --mapping: '{tmp}' is a directory: give a file"),
        (["train", *FILE_ARGS, "--out", "{tmp}/a-file"], "argument --out: '{tmp}/a-file' is a file: give a "
                                                         "directory"),
        (["score-file", *FILE_ARGS, "--model", "{tmp}/a-file", "--out", "{tmp}/s.csv"],
         "argument --model: '{tmp}/a-file' is a file: give a directory"),
        (["evaluate", *FILE_ARGS, "--out", "{tmp}/a-file"], "argument --out: '{tmp}/a-file' is a file"),
        (["score-file", *FILE_ARGS, "--out", "{tmp}/a-file/s.csv"],
         "argument --out: '{tmp}/a-file/s.csv' is inside '{tmp}/a-file', which is a file: give another path"),
        (["train", *FILE_ARGS, "--out", "{tmp}/a-file/m"],
         "argument --out: '{tmp}/a-file/m' is inside '{tmp}/a-file', which is a file: give another path"),
    ],
    ids=["score_file_out_dir", "data_dir", "mapping_dir", "train_out_file", "model_file", "eval_out_file",
         "score_file_out_under_a_file", "train_out_under_a_file"],
)  # fmt: skip
def test_paths_of_the_wrong_kind_are_refused_before_any_work(tmp_path, capsys, arguments, message):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(SystemExit) as exited:
        main([argument.format(tmp=tmp_path) for argument in arguments])
    assert exited.value.code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_train_does_not_overwrite_a_model(trained, capsys):
    before = (trained / "model.json").read_text()

    assert main(["train", *FILE_ARGS, "--out", str(trained)]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: --out {trained} already holds a model: give a new directory (workers loading that "
        "one must not see it change under them), or remove it first\n"
    )
    assert (trained / "model.json").read_text() == before


@pytest.mark.parametrize("option", ["--data", "--mapping"])
def test_score_file_does_not_write_over_its_own_input(tmp_path, capsys, option):
    data, mapping = tmp_path / "leads.csv", tmp_path / "mapping.toml"
    data.write_bytes(DATA.read_bytes())
    mapping.write_bytes(MAPPING.read_bytes())
    target = data if option == "--data" else mapping
    before = target.read_bytes()
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "elsewhere" / ".." / target.name  # the same file, spelt another way

    assert main(["score-file", "--data", str(data), "--mapping", str(mapping), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"leadscore: --out {out} is the {option} file: scores would replace it; give another file\n"
    )
    assert target.read_bytes() == before


def test_score_file_follows_no_link_planted_where_it_writes_first(tmp_path):
    """In a shared folder another user could plant a link at the name of the file written before the
    rename; the scores must never go through it."""
    out, victim = tmp_path / "scores.csv", tmp_path / "victim.txt"
    victim.write_text("someone else's file\n")
    (tmp_path / ".scores.csv.partial").symlink_to(victim)  # the name it used to write

    assert main(["score-file", *FILE_ARGS, "--out", str(out)]) == 0

    assert victim.read_text() == "someone else's file\n"
    assert out.read_text().startswith("Prospect ID,score,tier,reason\n")
    assert out.stat().st_mode & 0o777 == 0o666 & ~offline._umask()


def test_score_file_writes_utf_8_whatever_the_locale(tmp_path):
    frame = pd.read_csv(DATA, nrows=20)
    frame.loc[0, "Lead Source"] = "Référence société"
    data, out = tmp_path / "accented.csv", tmp_path / "scores.csv"
    frame.to_csv(data, index=False)
    run = "from integration.cli import main; raise SystemExit(main())"
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", run, "score-file", "--data", str(data), "--mapping",
         str(MAPPING), "--out", str(out)],
        env={**os.environ, "LC_ALL": "C", "LANG": "C"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert len(out.read_bytes().decode("utf-8").splitlines()) == 21


def test_score_file_that_fails_to_write_leaves_the_earlier_output_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.csv"
    out.write_text("an earlier run's scores\n")
    write = pd.DataFrame.to_csv

    def disk_fills_up(frame, path, **options):
        write(frame.head(10), path, **options)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_fills_up)
    assert main(["score-file", *FILE_ARGS, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("leadscore score-file: No space left on device: ")
    assert out.read_text() == "an earlier run's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no partial file left behind

    monkeypatch.undo()
    assert main(["score-file", *FILE_ARGS, "--out", str(out)]) == 0
    assert len(rows(out)) == 500


def test_a_bug_in_a_file_command_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only what the user can fix is said in one line: a ValueError from a bug propagates."""

    def broken(frame, path, **options):
        raise ValueError("a bug deep in pandas")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(ValueError, match="a bug deep in pandas"):
        main(["score-file", *FILE_ARGS, "--out", str(tmp_path / "scores.csv")])
    assert capsys.readouterr().err == ""


def test_a_damaged_model_is_named_as_such(trained, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model.json").write_text((trained / "model.json").read_text())
    (damaged / "model.joblib").write_bytes((trained / "model.joblib").read_bytes()[:1000])

    assert main(["score-file", *FILE_ARGS, "--model", str(damaged), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"leadscore score-file: {damaged} holds a damaged model (")
    assert err.endswith("): train it again, or copy the artifact directory over whole\n")


def test_a_mapping_naming_an_unknown_lead_field_is_refused(tmp_path, capsys):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('id = "Prospect ID"\nlabel = "Converted"\n[fields]\nlead_status = "Tags"\n')

    assert _train(tmp_path, DATA, mapping) == 2
    err = capsys.readouterr().err
    assert "[fields] names lead_status, which are not lead fields; use one of source, source_detail" in err


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[fields]\nllm_propensity = "AI score"\n',
         'llm_propensity is the LLM\'s answer (0-1), not a lead field: map its column under [custom] as '
         'llm_propensity = { column = "...", kind = "numeric" }'),
        ('[custom]\nllm_propensity = { column = "AI score" }\n', "llm_propensity is the LLM's answer"),
        ("", "maps no column to a feature: name some under [fields] (or [custom])"),
        ('[fields]\nstatus = "Tags"\n[monotone]\nstatus = "increasing"\n',
         "[monotone] names status, which is categorical: only a numeric or yes/no feature has an order "
         "to keep"),
        ('[fields]\nvisits = "TotalVisits"\n[monotone]\nvisitz = "increasing"\n',
         "[monotone] names visitz, which is neither a lead field nor a feature under [custom]"),
        ('[fields]\nvisits = "TotalVisits"\n[monotone]\nvisits = "up"\n',
         "monotone.visits: Input should be 'increasing' or 'decreasing'"),
        ('[fields]\nsource = "Lead Source"\n[monotone]\nvisits = "increasing"\n',
         "[monotone] names visits, which the training rows lack: map a column to it under [fields] or "
         "[custom] (from the store: no kept score has it yet, as llm_propensity before any LLM answer), "
         "or drop it from [monotone]"),
    ],
    ids=["llm_as_field", "llm_not_numeric", "no_features", "monotone_categorical", "monotone_unknown",
         "monotone_direction", "monotone_unmapped"],
)  # fmt: skip
def test_a_mapping_that_cannot_work_says_what_to_change(tmp_path, capsys, toml, message):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(f'id = "Prospect ID"\nlabel = "Converted"\n{toml}')

    assert _train(tmp_path, DATA, mapping) == 2
    assert message in capsys.readouterr().err


def test_a_numeric_feature_mapped_to_a_text_column_is_refused(tmp_path, capsys):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING.read_text().replace('visits = "TotalVisits"', 'visits = "Tags"'))

    assert _train(tmp_path, DATA, mapping) == 2
    assert capsys.readouterr().err == (
        "leadscore train: column 'Tags', mapped to the numeric feature visits, holds no numbers "
        "(first value: 'Interested in other courses'): map another column, add 'Interested in other courses' "
        "to `missing` if it stands for no value, or make a [custom] feature categorical\n"
    )


def test_labels_written_as_decimals_are_read(tmp_path):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame["Converted"] = frame["Converted"] + ".0"

    assert (
        tabular.labels(frame, "Converted").tolist()
        == tabular.labels(pd.read_csv(DATA, dtype=str), "Converted").tolist()
    )


def test_scoring_with_a_mapping_that_lacks_model_features_warns_and_writes(trained, tmp_path, capsys):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('id = "Prospect ID"\nlabel = "Converted"\n[fields]\nstatus = "Tags"\n')
    out = tmp_path / "new" / "dir" / "scores.csv"

    assert main(["score-file", "--data", str(DATA), "--mapping", str(mapping), "--model", str(trained),
                 "--out", str(out)]) == 0  # fmt: skip
    assert len(rows(out)) == 500
    err = capsys.readouterr().err
    assert (
        "warning: the mapping gives no column for 21 of the model's 22 features (source, source_detail, "
        in err
    )
    assert err.rstrip().endswith("they are scored as missing, which ranks less well")


@pytest.mark.parametrize("command", ["score-file", "evaluate"])
def test_a_mapping_that_maps_none_of_the_models_features_is_refused(trained, tmp_path, capsys, command):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        'id = "Prospect ID"\nlabel = "Converted"\n[custom]\nlead_number = { column = "Lead Number" }\n'
    )
    out = tmp_path / ("scores.csv" if command == "score-file" else "report")

    assert main([command, "--data", str(DATA), "--mapping", str(mapping), "--model", str(trained),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "the mapping gives no column for any of model " in capsys.readouterr().err
    assert not out.exists()  # not 500 rows of one score


def test_values_a_model_never_saw_are_named_when_scoring_and_evaluating(trained, tmp_path, capsys):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame.loc[:20, "Tags"] = "Asked for a callback"
    frame.loc[:10, "Lead Source"] = "TikTok"
    frame.loc[11:12, "Lead Source"] = "Podcast"
    frame.loc[13, "What is your current occupation"] = "Astronaut"
    data = _write(tmp_path, frame)

    assert main(["score-file", "--data", str(data), "--mapping", str(MAPPING), "--model", str(trained),
                 "--out", str(tmp_path / "scores.csv")]) == 0  # fmt: skip
    warning = (
        f"values model {TrainedModel.load(trained).version} never saw in training: Lead Source in 13 rows "
        "('TikTok', 'Podcast'); Tags in 21 rows ('Asked for a callback'); What is your current occupation in "
        "1 row ('Astronaut'). They score as unknown to it; retrain once they are common"
    )
    assert capsys.readouterr().err == f"warning: {warning}\n"
    assert main(["evaluate", "--data", str(data), "--mapping", str(MAPPING), "--model", str(trained),
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    assert warning in (tmp_path / "report" / "report.md").read_text()


def test_label_names_the_outcome_column_over_the_mapping(tmp_path):
    data = _write(
        tmp_path, pd.read_csv(DATA, dtype=str, keep_default_na=False).rename(columns={"Converted": "Won"})
    )

    assert main(["train", "--data", str(data), "--mapping", str(MAPPING), "--label", "Won",
                 "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"]["positive_rate"] == 0.37


def test_train_without_data_or_store_says_what_to_give(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "m")]) == 2
    assert "train needs --data FILE and --mapping MAP, or --from-store" in capsys.readouterr().err


def test_normalise_treats_placeholders_as_missing_and_folds_case():
    assert np.isnan(tabular.normalise("Select", "categorical", frozenset({"Select"})))
    assert tabular.normalise(" Google ", "categorical") == "google"
    assert tabular.normalise("google", "categorical") == "google"
    assert tabular.normalise("Yes", "boolean") == 1.0 and tabular.normalise("no", "boolean") == 0.0
    assert tabular.normalise("1.0", "boolean") == 1.0 and tabular.normalise("0.0", "boolean") == 0.0


@pytest.mark.parametrize(
    ("fields", "reachable"),
    [({}, (True, True)), ({"has_email": "Email?"}, (False, False))],
    ids=["no_contact_columns", "email_column_only"],
)  # fmt: skip
def test_a_file_without_contact_columns_is_taken_as_reachable(fields, reachable):
    frame = pd.DataFrame({"id": ["1"], "Email?": ["no"], "Title": ["VP Sales"]})
    mapping = tabular.Mapping(id="id", fields={"title": "Title", **fields})

    [lead] = tabular.leads_from_frame(frame, mapping)
    assert (lead.has_email, lead.has_phone) == reachable  # a mapped column speaks for both
    assert tabular.normalise("1,532", "numeric") == 1532.0


def _slice() -> pd.DataFrame:
    return pd.read_csv(DATA, dtype=str, keep_default_na=False)


@pytest.mark.parametrize(
    ("kept", "message"),
    [
        ((1, 495), "only 1 converted lead (label 'Converted')"),
        ((3, 315), "only 3 converted leads (label 'Converted')"),
        ((4, 4), "only 4 converted leads (label 'Converted')"),
        ((185, 2), "only 2 leads that did not convert (label 'Converted')"),
    ],
    ids=["one_converted", "three_converted", "eight_rows", "two_lost"],
)  # fmt: skip
def test_train_refuses_too_few_of_an_outcome_for_cross_validation(tmp_path, capsys, kept, message):
    frame = _slice()
    converted, lost = frame[frame["Converted"] == "1"], frame[frame["Converted"] == "0"]
    data = _write(tmp_path, pd.concat([converted.head(kept[0]), lost.head(kept[1])]))

    assert _train(tmp_path, data) == 2
    assert capsys.readouterr().err == (
        f"leadscore train: {message}: cross-validation in 5 folds needs at least 5 of each outcome; add "
        "labelled rows\n"
    )
    assert not (tmp_path / "m").exists()  # refused before any work


def test_no_nan_reaches_a_models_json(trained, tmp_path):
    model = TrainedModel.load(trained)
    model.meta["base_rate"] = float("nan")

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        model.save(tmp_path / "m")


@pytest.mark.parametrize("command", ["score-file", "evaluate"])
def test_a_mapping_reading_a_model_feature_as_another_kind_is_refused(trained, tmp_path, capsys, command):
    boolean = 'kind = "boolean", label = "Free copy"'
    assert boolean in MAPPING.read_text()
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING.read_text().replace(boolean, 'label = "Free copy"'))  # categorical

    out = tmp_path / ("scored.csv" if command == "score-file" else "report")
    assert main([command, *FILE_ARGS[:2], "--mapping", str(mapping), "--model", str(trained),
                 "--out", str(out)]) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        f"leadscore {command}: model {TrainedModel.load(trained).version} learned free_copy as boolean, but "
        "the mapping reads free_copy as categorical: make the mapping's kind match the model's\n"
    )
    assert not out.exists()


def test_a_comma_that_is_not_a_thousands_separator_makes_no_number():
    assert tabular.normalise("1,532", "numeric") == 1532.0
    assert tabular.normalise("-12,345,678.5", "numeric") == -12345678.5
    for text in ("2,5", "1,23", "1,2345", "12,34,567", "$1,532"):
        assert np.isnan(tabular.normalise(text, "numeric")), text


def test_numbers_that_cannot_be_read_are_counted_once_per_column(tmp_path, capsys):
    frame = _slice()
    frame.loc[[3, 8, 9], "Page Views Per Visit"] = ["2,5", "1 532", "45%"]
    frame.loc[20, "Do Not Email"] = "maybe"
    frame.loc[[30, 31], "TotalVisits"] = ["Select ", " Select"]  # the placeholder, spaced: no warning
    data = _write(tmp_path, frame)

    assert _run("score-file", tmp_path, data) == 0
    assert capsys.readouterr().err == (
        "warning: Do Not Email: 1 value(s) are not yes/no values and count as missing (first: 'maybe' on "
        "line 22)\n"
        "warning: Page Views Per Visit: 3 value(s) are not numbers and count as missing (first: '2,5' on "
        "line 5)\n"
    )
    assert _run("evaluate", tmp_path, data) == 0  # the report says what the terminal did
    assert "\n- `leads.csv`: Page Views Per Visit: 3 value(s) are not numbers and count as missing (first: " \
           "'2,5' on line 5).\n" in (tmp_path / "evaluate" / "report.md").read_text()  # fmt: skip


def test_rows_with_every_cell_blank_are_skipped(tmp_path, capsys):
    data = tmp_path / "leads.csv"
    commas = "," * (len(_slice().columns) - 1)
    data.write_text(DATA.read_text().replace("\n", "\n\n", 1) + f"{commas}\n{commas}\n \n")

    assert _run("score-file", tmp_path, data) == 0
    assert len(rows(tmp_path / "scored.csv")) == 500
    assert "scored 500 rows" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "score-file", "evaluate"])
def test_rows_without_an_id_are_refused(tmp_path, capsys, command):
    frame = _slice()
    frame.loc[[3, 9], "Prospect ID"] = ["", "  "]
    data = _write(tmp_path, frame)

    assert _run(command, tmp_path, data) == 2
    assert capsys.readouterr().err == (
        f"leadscore {command}: {data}: 2 row(s) have no Prospect ID (first on line 5): give each its id, "
        "or delete the row\n"
    )


def test_lines_are_counted_as_in_the_file(tmp_path, capsys):
    frame = _slice()
    frame.loc[1, "Lead Profile"] = "Potential Lead\nsee notes"  # a quoted cell over two lines
    frame.loc[10, "Converted"] = ""
    data = tmp_path / "leads.csv"
    data.write_text(frame.to_csv(index=False).replace("\n", "\n\n", 1))  # a blank line under the header

    assert _train(tmp_path, data) == 2
    assert "(first at line 14)" in capsys.readouterr().err  # header 1, blank 2, rows 3, 4-5, 6, ... 14


@pytest.mark.parametrize("quoting", [csv.QUOTE_MINIMAL, csv.QUOTE_ALL], ids=["bare", "quoted"])
@pytest.mark.parametrize(("separator", "named"), [(";", "semicolons"), ("\t", "tabs")])
def test_a_file_separated_by_semicolons_or_tabs_is_named_as_such(tmp_path, capsys, quoting, separator, named):
    data = tmp_path / "leads.csv"
    _slice().to_csv(data, sep=separator, index=False, quoting=quoting)

    assert _train(tmp_path, data) == 2
    assert capsys.readouterr().err == (
        f"leadscore train: data file {data} looks separated by {named}; save it as CSV (comma delimited)\n"
    )


def test_a_column_named_with_a_space_or_case_the_mapping_lacks_is_pointed_out(tmp_path, capsys):
    data = _write(tmp_path, pd.read_csv(DATA, dtype=str).rename(columns={"Tags": "Tags "}))

    assert _run("score-file", tmp_path, data) == 2
    assert capsys.readouterr().err.endswith("(it spells 'Tags ' for 'Tags': mind spaces and case)\n")


def test_rows_shorter_than_the_header_are_scored_and_said(tmp_path, capsys):
    """A Salesforce report's footer, or a row a bare line break split: read with blanks, and said."""
    data = _write(tmp_path, _slice())
    with data.open("a") as handle:
        handle.write("Grand Totals (300 records)\n\nConfidential Information - Do Not Distribute\n")

    assert _run("score-file", tmp_path, data) == 0
    assert "warning: 2 row(s) have fewer cells than the header's 37 (first: line 502, 1 cells)" in (
        capsys.readouterr().err
    )


def test_score_file_says_which_ids_repeat_and_train_refuses_them_whatever_their_spaces(tmp_path, capsys):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    frame.loc[7, "Prospect ID"] = frame.loc[2, "Prospect ID"] + " "
    data = _write(tmp_path, frame)

    assert _run("score-file", tmp_path, data) == 0
    repeated = frame.loc[7, "Prospect ID"]
    said = f"warning: 1 row(s) repeat an earlier row's Prospect ID (first: {repeated!r} on line 9)"
    assert said in capsys.readouterr().err
    assert _run("train", tmp_path, data) == 2
    assert "1 row(s) repeat an earlier row's Prospect ID" in capsys.readouterr().err


def test_score_file_reads_no_created_column_which_only_training_needs(tmp_path, capsys):
    mapping = tmp_path / "map.toml"
    mapping.write_text(
        MAPPING.read_text().replace('label = "Converted"\n', 'label = "Converted"\ncreated = "Created On"\n')
    )
    data = _write(tmp_path, _slice())  # no such column: the window is training's, not scoring's

    assert main(["score-file", "--data", str(data), "--mapping", str(mapping),
                 "--out", str(tmp_path / "scored.csv")]) == 0  # fmt: skip
    assert _run("train", tmp_path, data, mapping) == 2
    assert "has no column 'Created On'" in capsys.readouterr().err


def test_score_file_to_stdout_redirected_to_a_file_streams_the_scores_alone_into_it(tmp_path):
    """`--out /dev/stdout > scores.csv`: the stream written into (never a file put in its place, which
    as root would replace /dev/stdout itself), and what the command says kept out of the scores.
    /proc/self/fd/1 is the same stream, and one no process can replace, whatever the code does."""
    scores = tmp_path / "scores.csv"
    with scores.open("w") as stdout:
        done = subprocess.run(
            [sys.executable, "-m", "integration.cli", "score-file", *FILE_ARGS, "--out", "/proc/self/fd/1"],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, cwd=FIXTURES.parent, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = scores.read_text().splitlines()
    assert rows[0] == "Prospect ID,score,tier,reason" and len(rows) == 501
    assert b"scored 500 rows with the rules -> /proc/self/fd/1" in done.stderr


@pytest.mark.parametrize(
    ("out", "stream"),
    [("/dev/stdout", True), ("//dev/stdout", True), ("/tmp/../dev/stdout", True), ("/dev/fd/1", True),
     ("/proc/self/fd/1", True), ("/proc/self/cwd/scores.csv", False), ("/dev/shm/scores.csv", False)],
)  # fmt: skip
def test_the_shells_stdout_however_spelt_is_a_stream_and_a_regular_file_under_dev_or_proc_is_not(out, stream):
    assert offline.streams_into(Path(out)) is stream


def test_score_file_writes_into_a_pipe_without_replacing_it(tmp_path):
    pipe = tmp_path / "scores"
    os.mkfifo(pipe)
    read = subprocess.Popen(["cat", str(pipe)], stdout=subprocess.PIPE)

    assert main(["score-file", "--data", str(_write(tmp_path, _slice())), "--mapping", str(MAPPING),
                 "--out", str(pipe)]) == 0  # fmt: skip
    rows = read.communicate(timeout=30)[0].decode().splitlines()
    assert rows[0] == "Prospect ID,score,tier,reason" and len(rows) == 501
    assert pipe.is_fifo()


@pytest.mark.parametrize(
    ("line", "broken", "problem"),
    [
        (501, '"Acme, Inc', "a quote opened on line 501 is never closed"),
        (4, '"Acme, Inc', "',' expected after '\"' in the record starting on line 4 (check its quotes)"),
        (4, "Acme, Inc",
         "line 4 has 38 cells, the header 37 (put a cell that holds a comma in double quotes)"),
    ],
    ids=["quote_never_closed", "quote_closed_rows_later", "unquoted_comma"],
)  # fmt: skip
def test_a_row_that_breaks_the_csv_is_named_not_read_as_something_else(tmp_path, capsys, line, broken,
                                                                        problem):  # fmt: skip
    lines = DATA.read_text().splitlines(keepends=True)
    first, _, rest = lines[line - 1].split(",", 2)
    lines[line - 1] = f"{first},{broken},{rest}"  # the line's second cell
    data = tmp_path / "leads.csv"
    data.write_text("".join(lines))

    assert _run("score-file", tmp_path, data) == 2
    said = capsys.readouterr().err
    assert said == f"leadscore score-file: data file {data} is not a readable CSV: {problem}\n"


@pytest.mark.parametrize("option", ["--data", "--mapping", "--data with a byte order mark"])
def test_a_file_not_in_utf8_is_named_with_how_to_save_it(tmp_path, capsys, option):
    frame = _slice()
    frame.loc[2, "Tags"] = "Won’t say"
    data, mapping = tmp_path / "leads.csv", tmp_path / "mapping.toml"
    frame.to_csv(data, index=False, encoding="cp1252" if option.startswith("--data") else "utf-8")
    if option.endswith("mark"):
        data.write_bytes(codecs.BOM_UTF8 + data.read_bytes())
    mapping.write_text(MAPPING.read_text().replace("# How", "# Café: how", 1),
                       encoding="latin-1" if option == "--mapping" else "utf-8")  # fmt: skip

    assert _train(tmp_path, data, mapping) == 2
    said = (
        f'data file {data} is not UTF-8 (byte 0x92 on line 4): save it as "CSV UTF-8"'
        if option.startswith("--data")
        else f"mapping file {mapping} is not UTF-8 (byte 0xe9 on line 1): save it as UTF-8"
    )
    assert capsys.readouterr().err == f"leadscore train: {said}\n"


def test_a_mapping_starting_with_a_byte_order_mark_is_read(tmp_path):
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING.read_text(), encoding="utf-8-sig")

    assert tabular.load_mapping(mapping) == tabular.load_mapping(MAPPING)


@EACH_STORE
def test_train_from_store_learns_from_kept_scores_and_outcomes(env, tmp_path, capsys):
    table = offline.load_table(DATA, MAPPING, None, need_label=True)
    leads = tabular.leads_from_frame(table.frame, table.mapping)
    kept = Store(env["DATABASE_URL"])
    long_ago = datetime.now(UTC) - timedelta(days=45)
    kept.record_scores(
        ScoreRecord(
            crm="hubspot",
            account_id=PORTAL_ID,
            lead_id=lead.lead_id,
            score=50,
            tier="C",
            reason="r",
            scorer="rules+llm",
            fingerprint="f",
            features={**tabular.snapshot(lead), "time_on_site_s": seconds},  # read for a former model
            details={},
            scored_at=long_ago,
        )  # fmt: skip
        for lead, seconds in zip(leads, table.frame["Total Time Spent on Website"], strict=True)
    )
    kept.record_outcomes(
        [
            LeadFact("hubspot", PORTAL_ID, lead.lead_id, "customer", long_ago + timedelta(days=10))
            for lead, y in zip(leads, table.y, strict=True)  # within the 30 days that count
            if y
        ],
        "sync",
    )
    too_recent = ScoreRecord(
        crm="hubspot",
        account_id=PORTAL_ID,
        lead_id="new",
        score=50,
        tier="C",
        reason="r",
        scorer="rules+llm",
        fingerprint="f",
        features=tabular.snapshot(leads[0]),
        details={},
    )
    kept.record_scores([too_recent])  # no outcome yet and scored today: too early to call it a loss

    assert main(["train", "--from-store", "--min-age-days", "30", "--out", str(tmp_path / "m")]) == 0

    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["training"]["rows"] == 500 and meta["training"]["positive_rate"] == 0.37
    assert meta["training"]["store"] == make_url(env["DATABASE_URL"]).render_as_string(hide_password=True)
    assert meta["training"]["min_age_days"] == 30 and meta["training"]["snapshot"] == "first"
    assert meta["training"]["time_to_convert"] == {
        "conversions": 185, "after_horizon": 0, "median_days": 10.0, "p80_days": 10.0
    }  # fmt: skip
    assert meta["training"]["to"] == long_ago.isoformat(timespec="seconds")
    kinds = {f["name"]: f["kind"] for f in meta["features"]}
    assert kinds == tabular.LEAD_FIELD_KINDS  # what a worker reads for every lead
    assert meta["candidates"]["lightgbm"]["cv_auc_mean"] > 0.85  # the lead fields alone, without [custom]
    captured = capsys.readouterr()
    assert "warning: not learned from: time_on_site_s, kept with earlier scores but not named under" in (
        captured.err
    )  # without a mapping, no worker would read it for live leads
    assert "warning: feature status (kept with each lead's first score) looks recorded after or near the " \
           "outcome: alone it ranks leads at ROC AUC 0.908; 'will revert after reading the email': 105 " \
           "leads, 95.2% converted; 'ringing': 72 leads, 4.2% converted. Is it known" \
           in captured.err  # fmt: skip
    assert [leak["feature"] for leak in meta["training"]["suspected_leaks"]] == ["status"]
    assert "expected on unseen leads (out-of-fold): ROC AUC" in captured.out
    assert "  learnt from each lead's first score; 185 conversions, 0 of them over 30 days after their " \
           "first score, counted as not converted; first score to conversion: median 10 days, 80th " \
           "percentile 10 days\n" in captured.out  # fmt: skip
    model = TrainedModel.load(tmp_path / "m")  # live leads are normalised as the stored rows were
    live = pd.DataFrame(
        [tabular.lead_features(lead, model.kinds) for lead in leads], columns=list(model.kinds)
    )
    rows = training_rows(kept, 30)
    at = {lead_id: row for row, lead_id in enumerate(rows.leads)}  # the store streams leads in id order
    stored = rows.frame.iloc[[at[lead.lead_id] for lead in leads]]
    assert np.array_equal(model.predict(live), model.predict(stored))
    assert model.matrix(live)["status"].isna().sum() == 0  # no category unseen for being cased differently

    with_mapping = ["--mapping", str(MAPPING), "--out", str(tmp_path / "m2")]  # [monotone] binds here too
    assert main(["train", "--from-store", "--min-age-days", "30", "--snapshot", "last", *with_mapping]) == 0
    meta = json.loads((tmp_path / "m2" / "model.json").read_text())
    assert meta["model"] == "lightgbm" and meta["monotone"] == {"time_on_site_s": "increasing"}
    assert meta["training"]["snapshot"] == "last"
    model = TrainedModel.load(tmp_path / "m2")
    constraints = model.estimator.get_params()["monotone_constraints"]
    assert [name for name, sign in zip(model.kinds, constraints, strict=True) if sign] == ["time_on_site_s"]
    assert constraints[list(model.kinds).index("time_on_site_s")] == 1
    assert set(model.kinds) == {*tabular.LEAD_FIELD_KINDS, "time_on_site_s"}  # the only [custom] kept
    empty = [name for name in table.mapping.custom if name != "time_on_site_s"]
    assert f"warning: not learned from: {', '.join(empty)}, which no kept score has a value for" in (
        capsys.readouterr().err
    )  # so not taken for features every lead lacks
    assert "not learned from" not in capsys.readouterr().err


def test_train_from_an_empty_store_says_what_is_missing(env, tmp_path, capsys):
    assert main(["train", "--from-store", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (
        "leadscore train: the store has no labelled leads yet: a lead counts, converted or not, once it "
        "was first scored over 30 days ago (lower --min-age-days, or run `leadscore outcomes sync`)\n"
    )


def test_train_from_a_store_with_too_few_conversions_is_refused(env, tmp_path, capsys):
    table = offline.load_table(DATA, MAPPING, None, need_label=True)
    leads = tabular.leads_from_frame(table.frame, table.mapping)[:40]
    kept = Store(env["DATABASE_URL"])
    long_ago = datetime.now(UTC) - timedelta(days=45)
    kept.record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead.lead_id, score=50, tier="C", reason="r",
                    scorer="rules+llm", fingerprint="f", features=tabular.snapshot(lead), details={},
                    scored_at=long_ago)
        for lead in leads
    )  # fmt: skip
    kept.record_outcomes(
        [
            LeadFact("hubspot", PORTAL_ID, lead.lead_id, "customer", long_ago + timedelta(days=10))
            for lead in leads[:3]
        ],
        "sync",
    )

    assert main(["train", "--from-store", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (
        "leadscore train: only 3 converted leads in the store: cross-validation in 5 folds needs at least 5 "
        "of each outcome; run `leadscore outcomes sync`, or train once more leads have an outcome\n"
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("migrated", [False, True], ids=["no_file", "no_tables"])
def test_commands_that_read_the_store_refuse_one_the_workers_did_not_write(tmp_path, monkeypatch, capsys,
                                                                          migrated):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///leadscore.sqlite3")
    get_settings.cache_clear()
    if migrated:
        Store("sqlite:///leadscore.sqlite3").engine.connect().close()  # a file, but no schema
    fix = "point DATABASE_URL at the workers' store, or create it with `leadscore db upgrade`"
    problem = "holds no leadscore tables" if migrated else f"no score store at sqlite:///leadscore.sqlite3 " \
        f"(relative to {tmp_path})"  # fmt: skip

    assert main(["train", "--from-store", "--out", "m"]) == 2
    assert main(["evaluate", *FILE_ARGS, "--out", "report", "--with-store"]) == 2
    assert main(["outcomes", "sync"]) == 2
    err = capsys.readouterr().err.splitlines()
    shown = "" if not migrated else "sqlite:///leadscore.sqlite3 "
    assert err == [f"leadscore{cmd}: {shown}{problem}: {fix}" for cmd in (" train", " evaluate", "")]
    assert (tmp_path / "leadscore.sqlite3").exists() is migrated  # nothing left behind
    get_settings.cache_clear()


def test_train_tiers_must_descend(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", *FILE_ARGS, "--tiers", "50,80,20", "--out", str(tmp_path / "m")])
    assert exited.value.code == 2
    assert "argument --tiers: '50,80,20': expected A,B,C, three whole numbers 0-100 with A > B > C" in (
        capsys.readouterr().err
    )


def test_a_low_base_rate_is_warned_about_and_tiers_can_follow_it(tmp_path, capsys):
    frame = pd.read_csv(DATA, dtype=str, keep_default_na=False)
    positives = frame.index[frame["Converted"] == "1"]
    rare = frame.drop(positives[25:])  # 25 conversions in 340 leads: a 7% base rate
    data = _write(tmp_path, rare)

    assert _train(tmp_path, data) == 0
    out = capsys.readouterr().out
    assert "of leads land in tier D. The cut-offs (A 80, B 50, C 20) are calibrated conversion " in out
    assert out.rstrip().endswith("with a 7% base rate set lower ones, e.g. --tiers 29,15,7")

    assert main(["train", *("--data", str(data), "--mapping", str(MAPPING)), "--tiers", "29,15,7",
                 "--out", str(tmp_path / "m2")]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().out
    assert json.loads((tmp_path / "m2" / "model.json").read_text())["tiers"] == {"A": 29, "B": 15, "C": 7}


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((56, 70, 48, 80), {"points": 20.0, "ci95": [5.2, 33.4]}),  # Newcombe (1998), table II, method 10
        ((9, 10, 3, 10), {"points": 60.0, "ci95": [17.1, 80.9]}),
        ((5, 10, 0, 0), None),  # no holdout yet
    ],
)
def test_the_holdout_difference_has_newcombes_interval(counts, expected):
    assert rate_difference(*counts) == expected


def test_ece_and_the_calibration_plot_bin_alike_each_bin_holding_its_lower_edge():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.125, 0.1875, 0.5, 0.5625, 1.0])

    share, predicted, observed = calibration_bins(y, p)

    assert share.tolist() == [0.4, 0.4, 0.2]  # 0.5 sits with 0.5625, not with 0.4-0.5; 1.0 in the last
    assert predicted.tolist() == [0.15625, 0.53125, 1.0]
    assert observed.tolist() == [0.5, 0.5, 1.0]
    assert expected_calibration_error(y, p) == pytest.approx(0.15)  # 0.4 × 0.34375 + 0.4 × 0.03125


def test_the_last_calibration_bin_holds_what_is_below_1_and_1_itself():
    share, predicted, observed = calibration_bins(np.array([1, 0]), np.array([1.0, 0.95]))

    assert (share.tolist(), predicted.tolist(), observed.tolist()) == ([1.0], [0.975], [0.5])


def test_classification_metrics_are_the_textbook_ones_worked_by_hand():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])

    assert classification_metrics(y, p) == {
        "roc_auc": 0.75,  # 3 of the 4 (converter, non-converter) pairs ranked right
        "pr_auc": 0.8333,  # precision 1 at recall 0.5, 2/3 at recall 1
        "brier": 0.1581,  # (0.01 + 0.16 + 0.4225 + 0.04) / 4
        "ece": 0.3375,  # one lead a bin: (0.1 + 0.4 + 0.65 + 0.2) / 4
    }


def test_the_gains_curve_is_the_same_whatever_the_order_of_leads_with_tied_scores():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    converters_first = cumulative_gains(np.array([1, 1, 1, 0, 0, 1, 0, 0]), scores)
    converters_last = cumulative_gains(np.array([1, 0, 0, 1, 1, 0, 0, 1]), scores)

    assert [a.tolist() for a in converters_first] == [a.tolist() for a in converters_last]
    called, captured = converters_first  # one point per distinct score, a straight line across its ties
    assert called.tolist() == [0.0, 0.125, 0.625, 1.0]
    assert captured.tolist() == [0.0, 0.25, 0.75, 1.0]


def test_a_tier_without_leads_has_no_bar_and_each_bar_is_labelled_with_its_leads():
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    rates, labels = report.tier_bars(y, ["A", "A", "C", "C", "D", "D", "D", "D"])

    assert np.array_equal(rates, [0.5, np.nan, 0.0, 0.25], equal_nan=True)  # B empty, C never converts
    assert labels == ["n=2", "n=0", "n=2", "n=4"]


def test_conversions_reached_are_read_off_the_gains_curve_straight_across_tied_leads():
    y, scores = np.array([1, 1, 1, 0, 0, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])

    # the curve: 1 lead called reaches 1 of 4 conversions, 5 leads reach 3 (as above)
    assert conversions_reached(y, scores) == [0.2, 0.325, 0.425]


def _curves(scorers: int) -> dict:
    """`scorers` scorers of the same 1,000 leads, each ranking them a little better than the last."""
    rng = np.random.default_rng(7)
    y = (rng.random(1000) < 0.3).astype(int)
    curves = {}
    for i in range(scorers):
        p = np.clip(0.3 + 0.1 * (i + 1) * (y - 0.3) + rng.normal(0, 0.2, len(y)), 0, 1).round(2)
        curves[f"scorer {i}"] = (
            y,
            p,
            np.select([p >= 0.6, p >= 0.4, p >= 0.2], ["A", "B", "C"], "D").tolist(),
        )
    return curves


@pytest.fixture
def saved(monkeypatch) -> dict:
    """Each figure the report saves, by file name, with what it was saved with and a renderer to
    measure it by (closed, a figure keeps no canvas that can draw)."""
    figures = {}
    savefig = matplotlib.figure.Figure.savefig

    def keeping(figure, path, **options):
        savefig(figure, path, **options)
        figures[Path(path).name] = (figure, options, figure.canvas.get_renderer())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keeping)
    return figures


def _contrast_with_white(colour: str) -> float:
    """WCAG's contrast ratio of a colour against white."""
    linear = [
        c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in matplotlib.colors.to_rgb(colour)
    ]
    return 1.05 / (0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2] + 0.05)


def _legend_of(figure):
    [axes] = figure.axes
    return figure.legends[0] if figure.legends else axes.get_legend()


def test_scorers_differ_in_line_style_and_marker_not_colour_alone_and_the_diagonals_are_named(
    tmp_path, saved
):
    style = dict(matplotlib.rcParams)
    report.plots(tmp_path, _curves(5), cumulative_gains)

    assert dict(matplotlib.rcParams) == style  # no global style left behind for other code
    for png, diagonal in (("roc.png", "chance"), ("calibration.png", "perfectly calibrated"),
                          ("gains.png", "random order")):  # fmt: skip
        figure, options, _ = saved[png]
        assert options["dpi"] == 150
        lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
        scorers = [lines[f"scorer {i}"] for i in range(5)]
        assert len({line.get_linestyle() for line in scorers[:4]}) == 4
        assert len({line.get_marker() for line in scorers}) == 5
        colours = [line.get_color() for line in scorers]
        assert len(set(colours)) == 5 and min(map(_contrast_with_white, colours)) >= 3, png
        if png != "calibration.png":  # a point per lead score: markers spaced out, not one per point
            assert all(line.get_markevery() is not None for line in scorers)
        assert lines[diagonal].get_color() == "grey"
        assert diagonal in [text.get_text() for text in _legend_of(figure).get_texts()]


def test_the_tier_plot_keeps_its_legend_off_the_bars_one_overall_rate_and_its_counts_apart(tmp_path, saved):
    report.plots(tmp_path, _curves(5), cumulative_gains)

    figure, options, renderer = saved["tiers.png"]
    [axes] = figure.axes
    legend = _legend_of(figure)
    assert not legend.get_window_extent(renderer).overlaps(axes.get_window_extent(renderer))
    [overall] = axes.get_lines()  # once, not once per scorer: they share the leads
    assert (overall.get_label(), overall.get_color()) == ("overall conversion rate", "grey")
    assert "overall conversion rate" in [text.get_text() for text in legend.get_texts()]
    assert len({bars.patches[0].get_hatch() for bars in axes.containers}) == 5
    counts = [text for text in axes.texts if text.get_text().startswith("n=")]
    assert len(counts) == 5 * 4 and min(text.get_fontsize() for text in counts) >= 8
    boxes = [text.get_window_extent(renderer) for text in counts]
    assert not [pair for pair in itertools.combinations(boxes, 2) if pair[0].overlaps(pair[1])]
    inside = axes.get_window_extent(renderer)
    assert all(inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) for box in boxes)
    assert options["dpi"] == 150


@EACH_STORE
def test_evaluate_with_the_store_shows_holdout_and_rep_feedback(env, trained, tmp_path):
    kept = Store(env["DATABASE_URL"])
    now = datetime.now(UTC)
    old = now - timedelta(days=45)
    rows = [("1", 91, "A", False, old), ("2", 85, "A", True, old), ("3", 30, "D", False, old),
            ("4", 12, "D", True, old), ("5", 88, "A", False, now), ("6", 99, "A", False, old),
            ("7", 50, "B", True, now)]  # fmt: skip
    kept.record_scores(
        ScoreRecord(crm="salesforce", account_id="00D5g000004XyZa", lead_id=lead, score=score, tier=tier,
                    reason="r", scorer="model", fingerprint=lead, features={}, details={}, holdout=holdout,
                    scored_at=scored_at)
        for lead, score, tier, holdout, scored_at in rows
    )  # fmt: skip
    kept.record_outcomes([LeadFact("salesforce", "00D5g000004XyZa", "1", "converted")], "webhook")
    before = old - timedelta(days=3)  # a customer already when leadscore first scored it
    kept.record_outcomes([LeadFact("salesforce", "00D5g000004XyZa", "6", "converted", before)], "sync")
    kept.record_feedback(
        [
            Feedback("salesforce", "00D5g000004XyZa", "3", "too_low", 30, "D", "3"),
            Feedback("salesforce", "00D5g000004XyZa", "2", "too_high"),  # a holdout lead: nothing shown
            Feedback("salesforce", "00D5g000004XyZa", "3", "right", 30, "D", "3"),  # a change of mind
            Feedback("salesforce", "00D5g000004XyZa", "3", "too_low", 35, "D", "3b"),  # on a later score
        ]
    )
    out = tmp_path / "report"

    args = ["evaluate", "--data", str(DATA), "--mapping", str(MAPPING), "--with-store", "--out", str(out)]
    assert main(args) == 0

    summary = json.loads((out / "metrics.json").read_text())["store"]
    assert summary == {
        "scores": 7, "leads": 7, "converted": 1, "history_cut": 0, "min_age_days": 30.0,
        "holdout": {"scored": {"leads": 2, "converted": 1, "waiting": 1, "converted_before": 1,  # 5 is new
                               "outside_holdout": 0, "rate": 0.5},
                    "holdout": {"leads": 2, "converted": 0, "waiting": 1, "converted_before": 0,
                                "outside_holdout": 0, "rate": 0.0}},
        "shown_minus_holdout": {"points": 50.0, "ci95": [-27.3, 90.5]},
        "feedback": {"(held out)": {"too_high": 1}, "D": {"right": 1, "too_low": 1}},
    }  # fmt: skip
    report = (out / "report.md").read_text()
    assert "### Holdout (no visible score)" in report and "| D | 0 | 1 | 1 |" in report
    assert "| scored | 2 | 1 | 50.0% | 1 | 1 | 0 |" in report
    assert "Shown minus holdout: +50.0 points (95% interval -27.3 to +90.5): the interval includes 0" in (
        report
    )
    assert "| (held out) | 1 | 0 | 0 |" in report


def test_the_paired_auc_difference_is_the_difference_with_an_interval_that_knows_its_sample():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    informed, noise = y * 0.3 + rng.random(400), rng.random(400)
    better = paired_auc_difference(y, informed, noise)
    assert better["roc_auc"] == round(sklearn.metrics.roc_auc_score(y, informed)
                                      - sklearn.metrics.roc_auc_score(y, noise), 4)  # fmt: skip
    assert 0 < better["ci95"][0] < better["roc_auc"] < better["ci95"][1]
    assert paired_auc_difference(y, informed, informed) == {"roc_auc": 0.0, "ci95": [0.0, 0.0]}
    few = paired_auc_difference(y[:12], informed[:12], noise[:12])
    assert few["ci95"][0] <= 0 <= few["ci95"][1]  # twelve leads cannot tell these apart
    shuffled = rng.permutation(400)
    assert paired_auc_difference(y[shuffled], informed[shuffled], noise[shuffled]) == better

    def auc(labels, scores):  # Mann-Whitney, as roc_auc_score but quicker
        positives = labels == 1
        n = positives.sum()
        return (scipy.stats.rankdata(scores)[positives].sum() - n * (n + 1) / 2) / (n * (len(labels) - n))

    converted, unconverted = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    naive = []  # leads drawn one by one, converted and not apart, as the multinomial over kinds draws them
    for _ in range(2000):
        drawn = np.r_[rng.choice(converted, len(converted)), rng.choice(unconverted, len(unconverted))]
        naive.append(auc(y[drawn], informed[drawn]) - auc(y[drawn], noise[drawn]))
    assert np.percentile(naive, [2.5, 97.5]) == pytest.approx(better["ci95"], abs=0.01)


def test_what_the_llm_adds_on_too_few_outcomes_is_said_to_be_too_few_to_tell():
    scorer = {"leads": 200, "llm_adds": {"roc_auc": 0.5075, "ci95": [0.4353, 0.5712]},
              "tiers": [{"converted": 1}, {"converted": 0}]}  # fmt: skip
    assert report.llm_adds(scorer) == (
        "what the LLM's part adds to the ROC AUC of the rules alone (+0.5075) rests on 1 converted and 199 "
        "unconverted leads: too few to tell"
    )


@EACH_STORE
def test_a_scorer_whose_kept_scores_lack_the_blend_is_said_not_compared_with_the_rules_alone(env, tmp_path):
    config = load_config()
    lead = Lead(crm="hubspot", account_id=PORTAL_ID, lead_id="1", title="VP of Sales")
    answer = PropensityResult(0.85, 0.8, "r", model="gpt-4o-mini")
    result = with_provenance(
        blend_score(lead, evaluate_rules(lead, config), answer, config), answer, "1", config
    )
    weeks_ago = datetime.now(UTC) - timedelta(days=45)
    Store(env["DATABASE_URL"]).record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead_id, score=result.score,
                    tier=result.tier, reason="r", scorer="rules+llm", model_version="gpt-4o-mini",
                    fingerprint=lead_id, features={}, details=details, scored_at=weeks_ago)
        for lead_id, details in (("1", result.details), ("2", {}))  # an older row, without its blend
    )  # fmt: skip
    out = tmp_path / "report"

    assert main(["evaluate", "--with-store", "--out", str(out)]) == 0
    notes = json.loads((out / "metrics.json").read_text())["notes"]
    assert (
        "`live rules+llm gpt-4o-mini` is not compared with the rules alone: 1 of its leads' scores keep no "
        "blend to take the LLM's part from" in notes
    )


TITLES = ("VP of Sales", "Marketing Manager", "Student", "Head of Revenue Operations", "Office Assistant")


@EACH_STORE
def test_evaluate_from_the_store_measures_what_the_llms_part_adds_to_the_rules(env, tmp_path, capsys):
    """The rules alone, as the LLM down scores them, beside the rules+LLM scores on the same leads."""
    config = load_config()
    weeks_ago = datetime.now(UTC) - timedelta(days=45)
    leads, labels, blended, alone = [], [], [], []
    for i in range(60):
        converted = int(i % 3 == 0)
        lead = Lead(crm="hubspot", account_id=PORTAL_ID, lead_id=str(i), title=TITLES[i % 5], has_email=True,
                    source="ORGANIC_SEARCH" if i % 2 else "OFFLINE", company_size="100-500")  # fmt: skip
        rules = evaluate_rules(lead, config)
        answer = PropensityResult(0.85 if converted else 0.2, 0.8, "r", model="gpt-4o-mini")
        result = with_provenance(blend_score(lead, rules, answer, config), answer, str(i), config)
        leads.append(ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=str(i), score=result.score,
                                 tier=result.tier, reason=result.reason, scorer="rules+llm",
                                 model_version="gpt-4o-mini", fingerprint=str(i), features={},
                                 details=result.details, scored_at=weeks_ago))  # fmt: skip
        labels.append(converted)
        blended.append(result.score)
        alone.append(blend_score(lead, rules, fallback("down"), config).score)
    kept = Store(env["DATABASE_URL"])
    kept.record_scores(leads)
    kept.record_outcomes(
        [
            LeadFact("hubspot", PORTAL_ID, str(i), "customer", weeks_ago + timedelta(days=10))
            for i, y in enumerate(labels)
            if y
        ],
        "webhook",
    )
    out = tmp_path / "report"

    assert main(["evaluate", "--with-store", "--out", str(out)]) == 0

    scorers = json.loads((out / "metrics.json").read_text())["scorers"]
    name = "live rules+llm gpt-4o-mini"
    assert list(scorers) == [name, f"{name} without the LLM"]
    y, with_llm, without = np.array(labels), np.array(blended), np.array(alone)
    alone_scorer = scorers[f"{name} without the LLM"]
    assert alone_scorer["roc_auc"] == round(sklearn.metrics.roc_auc_score(y, without), 4)
    assert alone_scorer["tiers"] == tier_table(y, [config.tiers.tier_for(score) for score in without])
    adds = scorers[name]["llm_adds"]
    assert adds == paired_auc_difference(y, with_llm / 100, without / 100)
    assert adds["roc_auc"] > 0.1 and adds["ci95"][0] > 0
    said = f"the LLM's part adds {adds['roc_auc']:+.4f} to the ROC AUC of the rules alone"
    assert said in capsys.readouterr().out
    report_text = (out / "report.md").read_text()
    assert f"- `{name}`: on the same 60 leads, {said}" in report_text and "it excludes 0" in report_text


@EACH_STORE
def test_evaluate_from_the_store_alone_measures_the_scores_the_workers_wrote(env, tmp_path, capsys):
    kept = Store(env["DATABASE_URL"])
    weeks_ago = datetime.now(UTC) - timedelta(days=45)
    rules, model = ("rules+llm", None), ("model", "v7")
    rows = [("1", 91, "A", *rules), ("2", 85, "A", *rules), ("3", 30, "C", *rules), ("4", 12, "D", *rules),
            ("5", 80, "A", *model), ("6", 20, "C", *model)]  # fmt: skip
    kept.record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead, score=score, tier=tier, reason="r",
                    scorer=scorer, model_version=version, fingerprint=lead, features={}, details={},
                    scored_at=weeks_ago)
        for lead, score, tier, scorer, version in rows
    )  # fmt: skip
    kept.record_outcomes(
        [
            LeadFact("hubspot", PORTAL_ID, lead, "customer", weeks_ago + timedelta(days=10))
            for lead in ("1", "3", "5")
        ],
        "webhook",
    )
    out = tmp_path / "report"

    assert main(["evaluate", "--with-store", "--out", str(out)]) == 0

    scorers = json.loads((out / "metrics.json").read_text())["scorers"]
    assert list(scorers) == ["live rules+llm", "live v7"]
    live = scorers["live rules+llm"]
    assert (live["leads"], live["base_rate"], live["roc_auc"]) == (4, 0.5, 0.75)  # 30 ranks under 85
    assert live["tiers"][0] == {"tier": "A", "leads": 2, "share": 0.5, "conversion_rate": 0.5, "lift": 1.0,
                                "converted": 1, "ci95": [0.0945, 0.9055]}  # fmt: skip
    assert (scorers["live v7"]["leads"], scorers["live v7"]["roc_auc"]) == (2, 1.0)
    printed = capsys.readouterr().out
    assert "live rules+llm" in printed and "ROC AUC 0.7500" in printed
    report = (out / "report.md").read_text()
    assert "| live v7 | 2 | 50.0% | 1.0000 |" in report
    assert [scorer["scale"] for scorer in scorers.values()] == ["points", "probability"]
    assert "- `live rules+llm`: the rules' 0 to 100 is a points scale, not a probability" in report


@EACH_STORE
def test_evaluate_from_the_store_grades_each_leads_first_score_unless_told_the_last(env, tmp_path, capsys):
    """Reps lower the score of a lead they close out and raise that of one they move on to a deal:
    graded on those later scores, any scorer looks as good as the reps' own hindsight. A lead that
    converts after its first 30 days counts as not converted, and is counted."""
    kept = Store(env["DATABASE_URL"])
    now = datetime.now(UTC)
    rows = [
        ("1", 70, 60),
        ("1", 10, 50),
        ("2", 40, 60),
        ("2", 90, 45),
        ("3", 50, 60),
    ]  # lead, score, days ago
    kept.record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead, score=score, tier="B", reason="r",
                    scorer="rules+llm", fingerprint=f"{lead}-{days}", features={}, details={},
                    scored_at=now - timedelta(days=days))
        for lead, score, days in rows
    )  # fmt: skip
    kept.record_outcomes(
        [LeadFact("hubspot", PORTAL_ID, "2", "customer", now - timedelta(days=40)),  # 20 days after its first
         LeadFact("hubspot", PORTAL_ID, "3", "customer", now - timedelta(days=5))], "sync",  # 55 days after
    )  # fmt: skip
    timing = {"conversions": 2, "after_horizon": 1, "median_days": 37.5, "p80_days": 48.0}

    graded = {}
    for snapshot in ("first", "last"):
        out = tmp_path / snapshot
        assert main(["evaluate", "--with-store", "--snapshot", snapshot, "--out", str(out)]) == 0
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["live"] == {"snapshot": snapshot, "min_age_days": 30.0, "time_to_convert": timing}
        live = summary["scorers"]["live rules+llm"]
        graded[snapshot] = (live["leads"], live["base_rate"], live["roc_auc"])

    assert graded == {"first": (3, 0.3333, 0.0), "last": (3, 0.3333, 1.0)}
    timing_said = (
        "2 conversions, 1 of them over 30 days after their first score, counted as not converted; first "
        "score to conversion: median 37.5 days, 80th percentile 48 days"
    )
    assert f"store: each lead's first score graded; {timing_said}\n" in capsys.readouterr().out
    first, last = ((tmp_path / snapshot / "report.md").read_text() for snapshot in ("first", "last"))
    assert "from the score store: each lead's first score (`--snapshot first`), as reps saw the lead when " \
           "they chose whom to call. A lead counts as converted if it converted within 30 days of its " \
           "first score." in first  # fmt: skip
    assert "from the score store: each lead's last score before it converted, or its last in its first 30 " \
           "days (`--snapshot last`); later scores show what reps made of the lead, so these rows flatter " \
           "every scorer. A lead counts as converted if it converted within 30 days of its first score." in (
        last
    )  # fmt: skip
    assert f"Of leads first scored over 30 days ago: {timing_said}." in first


@EACH_STORE
def test_evaluate_from_a_young_store_shows_holdout_and_feedback_before_any_ranking(env, tmp_path, capsys):
    kept = Store(env["DATABASE_URL"])
    rows = [("2", 85, "A", True), ("1", 91, "A", False), ("3", 30, "D", False), ("4", 12, "D", True)]
    kept.record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead, score=score, tier=tier, reason="r",
                    scorer="rules+llm", fingerprint=lead, features={}, details={}, holdout=holdout)
        for lead, score, tier, holdout in rows
    )  # fmt: skip
    kept.record_outcomes([LeadFact("hubspot", PORTAL_ID, "1", "customer")], "webhook")  # none 30 days old
    kept.record_feedback([Feedback("hubspot", PORTAL_ID, "3", "too_low", 30, "D", "3")])
    out = tmp_path / "report"

    assert main(["evaluate", "--with-store", "--out", str(out)]) == 0

    assert "no scorer can be ranked yet (no scored leads of both outcomes)" in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["scorers"] == {}
    assert summary["store"]["holdout"]["scored"] == {
        "leads": 0, "converted": 0, "waiting": 2, "converted_before": 0, "outside_holdout": 0, "rate": None
    }  # fmt: skip
    assert summary["store"]["feedback"] == {"D": {"too_low": 1}}
    report = (out / "report.md").read_text()
    assert "### Holdout (no visible score)" in report and "| D | 0 | 0 | 1 |" in report
    assert "No difference yet: a group has no leads old enough (4 waiting)." in report
    assert "- No scorer can be ranked yet: that takes scored leads of both outcomes, and a lead counts, " \
           "converted or not, once it was first scored over 30 days ago" in report  # fmt: skip
    assert "## Plots" not in report and not list(out.glob("*.png"))


@EACH_STORE
def test_evaluate_without_a_holdout_says_no_lead_was_held_out(env, tmp_path):
    kept = Store(env["DATABASE_URL"])
    kept.record_scores(
        ScoreRecord(crm="hubspot", account_id=PORTAL_ID, lead_id=lead, score=score, tier=tier, reason="r",
                    scorer="rules+llm", fingerprint=lead, features={}, details={})
        for lead, score, tier in [("1", 91, "A"), ("2", 30, "D")]
    )  # fmt: skip
    out = tmp_path / "report"

    assert main(["evaluate", "--with-store", "--out", str(out)]) == 0

    report = (out / "report.md").read_text()
    assert (
        "| holdout | 0 | 0 | n/a | 0 | 0 | 0 |" in report and "| scored | 0 | 0 | n/a | 0 | 0 | 2 |" in report
    )
    assert "No difference: no lead was held out (set `HOLDOUT_SHARE` above 0 to measure the difference)." in (
        report
    )
    assert "waiting)" not in report


def test_evaluate_needs_a_file_or_the_store(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path / "r")]) == 2
    assert "evaluate needs --data FILE and --mapping MAP, or --with-store, or both" in capsys.readouterr().err
