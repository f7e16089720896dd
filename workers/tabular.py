"""Lead tables (CSV) and the mapping that says which column is which leadscore lead field.

The same feature names serve a CSV row, a row kept in the store and a lead read from a CRM,
so a model trained offline scores live leads. Pure functions of data; reading files is at
the edge (`read_table`, `load_mapping`).
"""

from __future__ import annotations

import codecs
import csv
import math
import re
import tomllib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from integration.errors import TableError
from integration.lead import Lead
from integration.text import folded

Kind = Literal["categorical", "numeric", "boolean"]
Direction = Literal["increasing", "decreasing"]
DIRECTION_SIGNS: dict[Direction, int] = {"increasing": 1, "decreasing": -1}
# The Lead fields a mapping may fill, and how each is used as a feature.
LEAD_FIELD_KINDS: dict[str, Kind] = {
    "source": "categorical",
    "source_detail": "categorical",
    "status": "categorical",
    "stage": "categorical",
    "rating": "categorical",
    "title": "categorical",
    "company_size": "categorical",
    "industry": "categorical",
    "recent_conversion": "categorical",
    "has_email": "boolean",
    "has_phone": "boolean",
    "email_bad": "boolean",
    "email_opted_out": "boolean",
    "do_not_call": "boolean",
    "conversions": "numeric",
    "visits": "numeric",
    "page_views": "numeric",
}
_TRUE = frozenset({"1", "1.0", "true", "yes", "y", "t"})  # 1.0 / 0.0: as spreadsheets and pandas write them
_FALSE = frozenset({"0", "0.0", "false", "no", "n", "f"})
LLM_FEATURE = "llm_propensity"
# What a worker reads for every lead, whatever the mapping: the lead fields and the LLM's propensity.
ALWAYS_READ: dict[str, Kind] = {**LEAD_FIELD_KINDS, LLM_FEATURE: "numeric"}
csv.field_size_limit(2**31 - 1)  # a notes cell may well exceed the csv module's default of 128 KiB
_GROUPED = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")  # 1,532 or 1,532.5: thousands


class CustomField(BaseModel):
    """A further model feature: its column in files, and the CRM property holding it live."""

    model_config = ConfigDict(extra="forbid")

    column: str
    kind: Kind = "categorical"
    label: str | None = Field(None, description="how reasons name it; default: the name, spaced")
    hubspot: str | None = Field(None, description="HubSpot contact property name")
    salesforce: str | None = Field(None, description="Salesforce Lead field API name")


class Mapping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the column identifying a lead")
    label: str | None = Field(None, description="the outcome column (1 = converted)")
    created: str | None = Field(
        None, description="the column of when each lead was created: a file-trained model's training window"
    )
    missing: list[str] = Field(default_factory=list, description="values meaning 'not filled in'")
    fields: dict[str, str] = Field(default_factory=dict, description="lead field -> column")
    custom: dict[str, CustomField] = Field(default_factory=dict)
    monotone: dict[str, Direction] = Field(
        default_factory=dict,
        description="numeric or yes/no features whose rise never lowers (increasing) or never raises "
        "(decreasing) a trained model's score",
    )

    @model_validator(mode="after")
    def _known_fields(self) -> Mapping:
        if LLM_FEATURE in self.fields or (
            LLM_FEATURE in self.custom and self.custom[LLM_FEATURE].kind != "numeric"
        ):
            raise ValueError(
                f"{LLM_FEATURE} is the LLM's answer (0-1), not a lead field: map its column under [custom] "
                f'as {LLM_FEATURE} = {{ column = "...", kind = "numeric" }}'
            )
        if not self.fields and not self.custom:
            raise ValueError("maps no column to a feature: name some under [fields] (or [custom])")
        unknown = sorted(set(self.fields) - set(LEAD_FIELD_KINDS))
        if unknown:
            raise ValueError(
                f"[fields] names {', '.join(unknown)}, which are not lead fields; use one of "
                f"{', '.join(LEAD_FIELD_KINDS)} or put the column under [custom]"
            )
        clash = sorted(set(self.custom) & set(LEAD_FIELD_KINDS))
        if clash:
            raise ValueError(f"[custom] reuses the lead field name(s) {', '.join(clash)}; rename them")
        known = {**LEAD_FIELD_KINDS, **{name: spec.kind for name, spec in self.custom.items()},
                 LLM_FEATURE: "numeric"}  # fmt: skip
        for name in self.monotone:
            if name not in known:
                raise ValueError(
                    f"[monotone] names {name}, which is neither a lead field nor a feature under [custom]"
                )
            if known[name] == "categorical":
                raise ValueError(
                    f"[monotone] names {name}, which is categorical: only a numeric or yes/no feature has "
                    "an order to keep"
                )
        return self

    def feature_kinds(self) -> dict[str, Kind]:
        return {
            **{name: LEAD_FIELD_KINDS[name] for name in self.fields},
            **{name: spec.kind for name, spec in self.custom.items()},
        }

    def monotone_for(self, kinds: dict[str, Kind]) -> dict[str, Direction]:
        """[monotone], checked against the features a model is trained on."""
        absent = [name for name in self.monotone if name not in kinds]
        if absent:
            raise TableError(
                f"[monotone] names {', '.join(absent)}, which the training rows lack: map a column to it "
                "under [fields] or [custom] (from the store: no kept score has it yet, as llm_propensity "
                "before any LLM answer), or drop it from [monotone]"
            )
        return dict(self.monotone)

    def labels(self) -> dict[str, str]:
        return {name: spec.label for name, spec in self.custom.items() if spec.label}

    def columns(self) -> dict[str, str]:
        """feature name -> column"""
        return {**self.fields, **{name: spec.column for name, spec in self.custom.items()}}


def load_mapping(path: Path) -> Mapping:
    try:
        return Mapping.model_validate(tomllib.loads(read_text(path, "mapping file", "save it as UTF-8")))
    except FileNotFoundError:
        raise TableError(f"mapping file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise TableError(f"mapping file {path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'mapping'}: {e['msg']}" for e in exc.errors())
        raise TableError(f"mapping file {path}: {problems}") from None


def read_text(path: Path, what: str, fix: str) -> str:
    """A file's text as UTF-8, a leading byte order mark dropped (Excel and Notepad write one). A file
    in another encoding (Excel's plain "CSV" is Windows-1252) is refused, naming the file and line."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path, what, fix) from None


def _not_utf8(path: Path, what: str, fix: str) -> TableError:
    """The refusal of a file that is not UTF-8, naming its first bad byte and that byte's line."""
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return TableError(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line}): {fix}")
    return TableError(f"{what} {path} is not UTF-8: {fix}")


class CsvFile(NamedTuple):
    header: list[str]
    lines: list[int]  # the line each record starts on (a quoted cell may span lines)
    cells_of: dict[str, list[str]]  # by column; of columns that share a name, the first
    too_wide: tuple[int, int] | None  # the first record with filled cells past the header: line, cells
    short: tuple[int, int, int] | None  # records with fewer cells than the header: count, first line, cells


def _read_csv(path: Path) -> CsvFile:
    """The file as a stream of records. Records with every cell blank are skipped: blank lines, and
    the `,,,` rows spreadsheets leave below. A short record is padded with blanks (a spreadsheet may
    leave out a row's empty cells at its end) and counted; blank cells past the header's width
    (trailing commas) are dropped. An unclosed quote is refused, not read as one cell holding the
    rest of the file."""
    header: list[str] | None = None
    too_wide: tuple[int, int] | None = None
    short: tuple[int, int, int] | None = None
    lines: list[int] = []
    cells_of: dict[str, list[str]] = {}
    positions: list[tuple[int, list[str]]] = []  # (position in a record, its column's cells)
    same: dict[str, str] = {}  # one string per distinct value: a column repeats few
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, strict=True)
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    if header is None:
                        header = cells
                        for position, name in enumerate(header):
                            if name not in cells_of:
                                positions.append((position, cells_of.setdefault(name, [])))
                    elif any(cell.strip() for cell in cells[len(header) :]):
                        too_wide = too_wide or (line, len(cells))
                    else:
                        if len(cells) < len(header):
                            short = (short[0] + 1, *short[1:]) if short else (1, line, len(cells))
                        lines.append(line)
                        for position, column in positions:
                            cell = cells[position] if position < len(cells) else ""
                            column.append(same.setdefault(cell, cell))
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise _not_utf8(path, "data file", 'save it as "CSV UTF-8"') from None
    except csv.Error as exc:
        separator = _other_separator(path) if header is None else None
        if separator:
            raise _separated_by(path, separator) from None
        problem = f"a quote opened on line {line} is never closed" if "end of data" in str(exc) else (
            f"{exc} in the record starting on line {line} (check its quotes)"
        )  # fmt: skip
        raise TableError(f"data file {path} is not a readable CSV: {problem}") from None
    if header is None:
        raise TableError(f"data file {path} is empty")
    return CsvFile(header, lines, cells_of, too_wide, short)


SEPARATORS = {";": "semicolons", "\t": "tabs"}


def _other_separator(path: Path) -> str | None:
    """The separator the file's first record reads as cells between, of a semicolon (as a spreadsheet
    in a comma-decimal locale saves CSV) or a tab (a TSV export); quoted, such a record is not even a
    readable comma-separated one."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        first = next((line for line in handle if line.strip()), "")
    for separator in SEPARATORS:
        try:
            if len(next(csv.reader([first], delimiter=separator, strict=True), [])) > 1:
                return separator
        except csv.Error:
            continue
    return None


def _separated_by(path: Path, separator: str) -> TableError:
    return TableError(
        f"data file {path} looks separated by {SEPARATORS[separator]}; save it as CSV (comma delimited)"
    )


def line_of(frame: pd.DataFrame, rows) -> int:
    """The line in the file of the first row where `rows` (a mask) holds: `read_table` indexes each
    row by the line it starts on, blank lines and cells spanning lines counted."""
    return int(frame.index[np.asarray(rows, dtype=bool)][0])


def read_table(path: Path, mapping: Mapping, need_label: bool) -> tuple[pd.DataFrame, list[str]]:
    """The file's rows, checked against the mapping; every cell read as text, each row indexed by its
    line in the file (`line_of`); and warnings of what was read though it may not be meant."""
    try:
        header, lines, cells_of, too_wide, short = _read_csv(path)
    except FileNotFoundError:
        raise TableError(f"data file {path} does not exist") from None
    features = mapping.columns()
    wanted = [mapping.id, *features.values(), *([mapping.created] if mapping.created and need_label else [])]
    if need_label:
        if not mapping.label:
            raise TableError("no label column: pass --label COLUMN or set `label` in the mapping")
        wanted.append(mapping.label)
    leaked = [name for name, column in features.items() if column == mapping.label]
    if leaked:
        raise TableError(
            f"the label column {mapping.label!r} is also mapped as {', '.join(leaked)}: a model would "
            "learn the outcome from itself; map it only as the label"
        )
    missing = [c for c in dict.fromkeys(wanted) if c not in header]
    for separator in SEPARATORS:
        if missing and set(missing) <= set(",".join(header).split(separator)):
            raise _separated_by(path, separator)
    if missing:
        near = [f"{h!r} for {c!r}" for c in missing for h in header if h != c and folded(h) == folded(c)]
        raise TableError(
            f"{path} has no column {', '.join(repr(c) for c in missing)} that the mapping (or --label) "
            f"names; its columns are: {', '.join(header)}"
            + (f" (it spells {', '.join(near)}: mind spaces and case)" if near else "")
        )
    twice = [c for c in dict.fromkeys(wanted) if header.count(c) > 1]
    if twice:
        raise TableError(
            f"{path} has more than one column named {', '.join(repr(c) for c in twice)}, which the mapping "
            "names: rename or delete the one it does not mean"
        )
    if too_wide:
        raise TableError(
            f"data file {path} is not a readable CSV: line {too_wide[0]} has {too_wide[1]} cells, the header "
            f"{len(header)} (put a cell that holds a comma in double quotes)"
        )
    if not lines:
        raise TableError(f"{path} has a header but no rows")
    frame = pd.DataFrame(cells_of, index=pd.Index(lines, name="line"), dtype=str)
    warnings = []
    if short:
        count, line, cells = short
        warnings.append(
            f"{count} row(s) have fewer cells than the header's {len(header)} (first: line {line}, {cells} "
            "cells) and are read with blanks for the rest; if they are a report's totals or footer, or a "
            "row split by a line break outside double quotes, fix the file"
        )
    ids = frame[mapping.id].str.strip()
    if (ids == "").any():
        raise TableError(
            f"{path}: {int((ids == '').sum())} row(s) have no {mapping.id} (first on line "
            f"{line_of(frame, ids == '')}): give each its id, or delete the row"
        )
    repeated = ids.duplicated()
    if repeated.any():
        said = (
            f"{int(repeated.sum())} row(s) repeat an earlier row's {mapping.id} (first: "
            f"{frame[mapping.id][repeated].iloc[0]!r} on line {line_of(frame, repeated)})"
        )
        if need_label:
            raise TableError(
                f"{path}: {said}: a lead on both sides of a cross-validation split, or counted twice, makes "
                "the numbers optimistic; keep one row per lead"
            )
        warnings.append(f"{said}: each is scored, and a CRM import keeps the last")
    return frame, warnings


def created_window(frame: pd.DataFrame, column: str) -> dict[str, str]:
    """When the file's leads were created, first to last (blank cells skipped): the training window
    of a model trained on it. Only ISO 8601 is read: a date like 05/11/2026 is the 5th of November in
    one country and the 11th of May in another. A cell that is not one is refused, naming its line."""
    cells = frame[column].str.strip()
    moments = pd.to_datetime(cells, errors="coerce", utc=True, format="ISO8601")
    bad = moments.isna() & (cells != "")
    if bad.any():
        raise TableError(
            f"created column {column!r} holds {cells[bad].iloc[0]!r} at line {line_of(frame, bad)}, which is "
            "not an ISO 8601 date (use e.g. 2026-11-02T09:30:00Z, as HubSpot and Salesforce export them)"
        )
    if moments.isna().all():
        raise TableError(
            f"created column {column!r} is empty: map it only if it holds when leads were created"
        )
    return {
        "from": moments.min().isoformat(timespec="seconds"),
        "to": moments.max().isoformat(timespec="seconds"),
    }


def labels(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The outcome column as 0/1; refuses empty cells and anything not binary."""
    raw = frame[column].str.strip().str.lower()
    empty = int((raw == "").sum())
    if empty:
        raise TableError(
            f"label column {column!r} is empty in {empty} of {len(raw)} rows (first at line "
            f"{line_of(frame, raw == '')}); "
            "every row needs an outcome (1 = converted, 0 = not)"
        )
    strange = ~raw.isin(_TRUE | _FALSE)
    if strange.any():
        found = frame[column].str.strip()[strange].unique()  # as the file spells them
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise TableError(
            f"label column {column!r} is not binary: found {', '.join(repr(v) for v in found[:5])}{more} "
            f"(first at line {line_of(frame, strange)}); expected 1/0, true/false or yes/no"
        )
    y = raw.isin(_TRUE).to_numpy().astype(int)
    if y.min() == y.max():
        raise TableError(f"label column {column!r} holds only {y[0]}s: a model needs both outcomes")
    return y


def normalise(
    value: object, kind: Kind, missing: frozenset[str] = frozenset(), keep_case: bool = False
) -> object:
    """One cell or CRM value as a feature value: categories lower-cased (with `keep_case`, spelled as
    given, for a reason a rep reads), booleans 0/1, NaN when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return np.nan
    if isinstance(value, bool):
        return float(value) if kind != "categorical" else str(value).lower()
    text = " ".join(str(value).split())
    if not text or text in missing:
        return np.nan
    if kind == "categorical":
        return text if keep_case else text.lower()
    if kind == "boolean":
        lowered = text.lower()
        return 1.0 if lowered in _TRUE else 0.0 if lowered in _FALSE else np.nan
    if "," in text and not _GROUPED.fullmatch(text):
        return np.nan  # "2,5" is two and a half in much of Europe, 25 read as thousands: neither is sure
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        return np.nan
    return number if math.isfinite(number) else np.nan


def feature_frame(frame: pd.DataFrame, mapping: Mapping) -> tuple[pd.DataFrame, list[str]]:
    """One column per mapped feature, values normalised, categories still spelled as the file spells
    them (`model_values` gives what a model matches); and a warning for each numeric or yes/no column
    some of whose values cannot be read, which count as missing."""
    missing = frozenset(mapping.missing)
    kinds = mapping.feature_kinds()
    features = pd.DataFrame(
        {
            name: [normalise(v, kinds[name], missing, keep_case=True) for v in frame[column]]
            for name, column in mapping.columns().items()
        },
        index=frame.index,
    )
    warnings = []
    for name, column in mapping.columns().items():
        spaced = frame[column].str.split().str.join(" ")  # as `normalise` reads each cell
        filled = spaced.ne("") & ~spaced.isin(missing)
        unread = filled & features[name].isna()
        if kinds[name] == "categorical" or not unread.any():
            continue
        expected = "numbers" if kinds[name] == "numeric" else "yes/no values"
        first = frame.loc[unread, column].iloc[0]
        if unread.sum() == filled.sum():
            raise TableError(
                f"column {column!r}, mapped to the {kinds[name]} feature {name}, holds no {expected} "
                f"(first value: {first!r}): map another column, add {first!r} to `missing` if it stands "
                "for no value, or make a [custom] feature categorical"
            )
        warnings.append(f"{column}: {unread.sum()} value(s) are not {expected} and count as missing "
                        f"(first: {first!r} on line {line_of(frame, unread)})")  # fmt: skip
    return features, warnings


# Counters a CRM that records no web engagement (Salesforce's Lead) leaves at 0: unknown, not none.
ENGAGEMENT_COUNTERS = ("conversions", "visits", "page_views")


def snapshot(lead: Lead, propensity=None) -> dict[str, object]:
    """Everything a model could learn from this lead, raw, as the store keeps it. Engagement a CRM
    does not record is missing, so a model learning from both CRMs does not take a Salesforce Lead
    for one that never visited."""
    values = {name: getattr(lead, name) for name in LEAD_FIELD_KINDS}
    if not lead.engagement_known:
        values.update(dict.fromkeys(ENGAGEMENT_COUNTERS))
    values.update(lead.custom)
    if propensity is not None and (not propensity.fallback or propensity.previous):
        values[LLM_FEATURE] = propensity.propensity
    return values


def lead_features(
    lead: Lead, kinds: dict[str, Kind], propensity=None, keep_case: bool = False
) -> dict[str, object]:
    """A live lead's features under the names a model was trained with (`propensity`: the LLM's
    answer, a feature when the model has one; a fallback counts as missing, unless the LLM's last
    answer stands in for it while the LLM fails, so the lead's tier does not move and move back)."""
    raw = snapshot(lead, propensity)
    return {name: normalise(raw.get(name), kind, keep_case=keep_case) for name, kind in kinds.items()}


def model_values(shown: pd.DataFrame, kinds: dict[str, Kind]) -> pd.DataFrame:
    """The values a model matches, from the features as spelled for reps: categories lower-cased, as
    `normalise` gives them. One normalising pass serves both."""
    lowered = {
        name: shown[name].map(str.lower, na_action="ignore")
        for name, kind in kinds.items()
        if kind == "categorical" and name in shown.columns
    }
    return shown.assign(**lowered)


# A file without contact columns says nothing about whether its leads can be reached: the rules
# take them as reachable rather than mark every one "No email or phone". Map either, and the file
# speaks for both.
ASSUMED_WHEN_UNMAPPED = {"has_email": True, "has_phone": True}


def leads_from_frame(frame: pd.DataFrame, mapping: Mapping) -> list[Lead]:
    """Rows as Leads, so the rules scorer reads a file the way it reads a CRM."""
    missing = frozenset(mapping.missing)
    assumed = {} if set(ASSUMED_WHEN_UNMAPPED) & set(mapping.fields) else ASSUMED_WHEN_UNMAPPED
    leads = []
    for row in frame.to_dict("records"):
        values: dict[str, object] = dict(assumed)
        for name, column in mapping.fields.items():
            value = normalise(row[column], LEAD_FIELD_KINDS[name], missing)
            if isinstance(value, float) and math.isnan(value):
                continue
            kind = LEAD_FIELD_KINDS[name]
            if kind == "boolean":
                value = bool(value)
            elif kind == "numeric":
                value = max(0, int(value))
            else:
                value = " ".join(str(row[column]).split())  # the rules match words case-insensitively
            values[name] = value
        leads.append(Lead(crm="file", account_id="file", lead_id=str(row[mapping.id]), **values))
    return leads
