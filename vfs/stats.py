"""Per-label statistics of search scores: how well a region's similarity separates labelled groups.

Used for the paper's distribution study (e.g. the best-region score of every chest X-ray, grouped by
"Cardiomegaly present") and for comparing the rankings two models give the same dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

MISSING = "(missing)"
"""The group of the images without a value in a column (`is_missing`)."""


def is_missing(value: object) -> bool:
    """None, NaN, pd.NA and NaT: what a manifest's nullable, float and time columns hold for a gap —
    what the cache stores as missing, the group `MISSING` holds, and no caption, tile or JSON shows."""
    return bool(pd.api.types.is_scalar(value) and pd.isna(value))


SEPARATOR = "|"
GROUP_TABLE_COLUMNS = (
    "group",
    "n",
    "median",
    "mean",
    "std",
    "auroc",
    "auroc_low",
    "auroc_high",
    "p_value",
    "q_value",
)
"""`group_table`'s columns, in order (the Distributions page shows them as they are)."""


def _labels(values: pd.Series) -> pd.Series:
    """Normalise a label column to strings so one splitter handles every kind of column.

    Booleans and true/false strings become "True"/"False" (so `bool` and CSV-loaded columns group
    alike), whitespace around '|' and empty findings ("Effusion|", "a||b") are dropped, and missing
    or empty values get their own visible group.
    """
    text = values.astype("string").str.strip()
    text = text.str.replace(r"\s*\|[\s|]*", SEPARATOR, regex=True).str.strip(SEPARATOR)
    text = text.mask(text == "")  # missing before the true / false test: a blank cell is no third value
    present = text.dropna().str.lower()
    if not present.empty and present.isin(["true", "false"]).all():
        text = text.str.capitalize()
    return text.fillna(MISSING)


def label_groups(records: pd.DataFrame, column: str) -> pd.DataFrame:
    """Boolean membership table (index = records.index, one column per group) for `column`.

    '|'-joined multi-label values (NIH "Cardiomegaly|Effusion") make one group per finding, meaning
    "finding present"; plain values make one group per distinct value. Splitting on '|' covers both,
    since a value without '|' is a single finding.
    """
    return _labels(records[column]).str.get_dummies(sep=SEPARATOR).astype(bool)


QUARTILES = " (quartiles)"
"""The suffix of a numeric column's name that groups images by its quartiles (`column_groups`)."""


def quartile_groups(values: pd.Series) -> pd.DataFrame:
    """Four groups of about as many images each by a numeric column's quartiles (fewer where values
    repeat across a boundary, or are few), each named by its least and greatest value ("20–38"
    holds every image with 20 ≤ age ≤ 38: names say what is in a group, not the cut between
    groups); the rows without a number are the group `MISSING`, first, as `label_groups` has
    them (described, not tested: they were in no group, unlike the column's own grouping, which
    shows them; app review), an infinite one in the first or last group (its name then says "inf":
    quantiles of infinities would leave whole groups out)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)  # Int64's NA as NaN
    missing = {MISSING: numbers.isna().to_numpy()} if numbers.isna().any() else {}
    finite = numbers[np.isfinite(numbers)]
    if finite.empty:
        return pd.DataFrame(missing, index=values.index)
    bins = pd.qcut(numbers.clip(finite.min(), finite.max()), 4, labels=False, duplicates="drop")
    members = [(bins == code).to_numpy(bool) for code in sorted(bins.dropna().unique())]
    ranges = [(float(numbers[m].min()), float(numbers[m].max())) for m in members]
    ends = sorted({end for pair in ranges for end in pair})

    def shown(value: float, digits: int) -> str:  # no exponent: "1700000000", "39.5"
        return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-")

    digits = 6  # as many as tell the ends apart (timestamps, frame numbers share their first six)
    while len({shown(e, digits) for e in ends}) < len(ends) and digits < 17:
        digits += 1
    names = [shown(a, digits) if a == b else f"{shown(a, digits)}–{shown(b, digits)}" for a, b in ranges]
    return pd.DataFrame(missing | dict(zip(names, members)), index=values.index)


def binnable_columns(records: pd.DataFrame, fewest: int = 9) -> list[str]:
    """Numeric columns (not booleans) with at least `fewest` distinct values: an age, a size, a
    score — grouped by quartiles (`QUARTILES`) where one group per value would be too many."""
    return [
        str(c)
        for c in records.columns
        if pd.api.types.is_numeric_dtype(records[c])
        and not pd.api.types.is_bool_dtype(records[c])
        and records[c].nunique() >= fewest
    ]


def column_groups(records: pd.DataFrame, column: str) -> pd.DataFrame:
    """`label_groups` of a column, or `quartile_groups` of "<column> (quartiles)"."""
    base = column.removesuffix(QUARTILES)
    if base != column and base in records.columns:
        return quartile_groups(records[base])
    if column not in records.columns:  # a spec's label column its manifest lacks: a KeyError's traceback
        raise ValueError(
            f"the manifest has no column {column!r} (columns: {', '.join(map(str, records.columns))})"
        )
    return label_groups(records, column)


def in_any_group(groups: pd.DataFrame, names: Sequence[str], where: str) -> np.ndarray:
    """Which images belong to any of the groups `names` (a label filter: the CLI's --label, the Search
    page's "Only these labels"); a name no group has is refused with the ones `where` has."""
    unknown = [name for name in names if name not in groups.columns]
    if unknown:
        known = ", ".join(map(str, groups.columns[:20])) + (", …" if len(groups.columns) > 20 else "")
        raise ValueError(f"no image of {where} has the label {unknown[0]!r} (its labels: {known})")
    return groups[list(names)].any(axis=1).to_numpy()


MOST_GROUPS = 50
"""The most groups a column may make to be grouped by: past it, a column of ids or paths (one image a
group) whose table and plot would tell nothing; a numeric one groups by quartiles instead."""


def group_count(records: pd.DataFrame, column: str) -> int:
    """How many groups of a value `column` makes: `label_groups`' groups but the missing one, counted
    without building them (a column of 10,000 ids would make 10,000 columns)."""
    values = _labels(records[column]).str.split(SEPARATOR).explode()
    return int(values[values != MISSING].nunique())  # as `tested_groups`, a "(missing)" finding too


def grouping_columns(records: pd.DataFrame, most: int = MOST_GROUPS) -> list[str]:
    """The columns worth grouping scores by, as the Distributions page and the notebook offer them:
    those making 2 to `most` groups of a value (the images without one are no group to test), then
    the numeric ones by quartiles ("age (quartiles)"). Not `path`."""
    columns = [str(c) for c in records.columns if c != "path"]
    plain = [c for c in columns if 2 <= group_count(records, c) <= most]
    return plain + [c + QUARTILES for c in binnable_columns(records) if c != "path"]


def presence(records: pd.DataFrame, column: str, value: str) -> pd.Series:
    """Whether `value` is among each row's (possibly '|'-joined) labels: the "F present: True/False" split."""
    groups = label_groups(records, column)
    if value in groups.columns:
        return groups[value]
    return pd.Series(False, index=records.index, name=value)


def is_multilabel(records: pd.DataFrame, column: str) -> bool:
    """Whether a column holds '|'-joined labels (then one finding can be split off as present / absent)."""
    return bool(records[column].astype(str).str.contains(SEPARATOR, regex=False).any())


def presence_groups(records: pd.DataFrame, column: str, value: str) -> pd.DataFrame:
    """Two groups, "True" / "False": rows whose labels include `value`, and the other labelled rows.
    A row without a value is in neither: an unknown finding is not an absent one."""
    present = presence(records, column, value)
    known = _labels(records[column]) != MISSING
    return pd.DataFrame({"True": present, "False": known & ~present})


def findings(records: pd.DataFrame, column: str) -> list[str]:
    """The values of `column` one can split off as present / absent: each group but MISSING (an image
    without a value has no finding to be present)."""
    return [g for g in label_groups(records, column).columns if g != MISSING]


def score_groups(records: pd.DataFrame, column: str, finding: str | None = None) -> tuple[pd.DataFrame, str]:
    """What the Distributions page and the notebook's `distribution_table` group scores by, and its
    name: one group per value of `column` (per finding of a '|'-joined one; its quartiles for
    "<column> (quartiles)"), or, given a `finding`, the images with and without it (`presence_groups`)."""
    if finding is None:
        return column_groups(records, column), column
    present = findings(records, column)
    if finding not in present:
        raise ValueError(f"no image has {finding!r} in column {column!r}; its values: {', '.join(present)}")
    return presence_groups(records, column, finding), f"{finding} present"


class _RankedPool:
    """Scores ranked once, to compare several groups of them against the rest: every group of a
    `group_table` is compared within the same pool (the grouped images), so sorting it once serves them all.
    A group's ranks within itself and within its rest are counted along the pool's tie blocks, O(n)
    (scipy's `rankdata` / `mannwhitneyu` rank anew on every call: 225 ms for 32 groups of 10,000)."""

    def __init__(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=float).reshape(-1)
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        self.has_nan = bool(np.isnan(ordered[-1:]).any())  # NaN sorts last
        self.starts = np.flatnonzero(np.r_[ordered.size > 0, ordered[1:] != ordered[:-1]])
        self.ties = np.diff(np.r_[self.starts, ordered.size]).astype(float)  # each block's size
        self.midranks = self.starts + (self.ties + 1) / 2  # a block's average rank in the pool
        self.tie_term = float((self.ties**3 - self.ties).sum())

    def counts(self, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How many of each tie block are positive and how many are not."""
        positive = np.asarray(positive, bool).reshape(-1)
        if positive.size != self.order.size:
            raise ValueError(f"{positive.size} true/false values for {self.order.size} scores: one per score")
        inside = np.add.reduceat(positive[self.order].astype(float), self.starts)
        return inside, self.ties - inside

    def u_statistic(self, inside: np.ndarray) -> float:
        """Mann–Whitney U of the positives (`counts`' first part): their rank sum less its least."""
        m = inside.sum()
        return float(inside @ self.midranks - m * (m + 1) / 2)

    def auroc(self, positive: np.ndarray) -> float:
        inside, outside = self.counts(positive)
        m, n = inside.sum(), outside.sum()
        if m == 0 or n == 0 or self.has_nan:
            return float("nan")
        return self.u_statistic(inside) / (m * n)

    def auroc_interval(self, positive: np.ndarray, level: float) -> tuple[float, float]:
        inside, outside = self.counts(positive)
        m, n = inside.sum(), outside.sum()
        if min(m, n) < INTERVAL_FEWEST or self.has_nan:
            return float("nan"), float("nan")
        # Each positive's share of negatives below it, each negative's share of positives above it
        # (ties one half), block by block: the structural components whose mean is the AUROC.
        below_in, below_out = np.cumsum(inside) - inside, np.cumsum(outside) - outside
        v10 = np.repeat((below_out + outside / 2) / n, inside.astype(int))
        v01 = np.repeat(1 - (below_in + inside / 2) / m, outside.astype(int))
        se = np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
        from scipy import stats  # here, not at import: a search or a build never pays for scipy.stats

        area, z = v10.mean(), stats.norm.ppf(0.5 + level / 2)
        if not (0 < area < 1 and se > 0):
            return float("nan"), float("nan")
        logit, spread = np.log(area / (1 - area)), z * se / (area * (1 - area))
        low, high = stats.logistic.cdf([logit - spread, logit + spread])
        return float(low), float(high)

    def p_value(self, positive: np.ndarray) -> float:
        """Two-sided Mann–Whitney p-value of the positives against the rest of the pool: exact where no
        score is tied and counting its null takes at most `EXACT_WORK` coefficients, else asymptotic with
        the tie and continuity corrections (as scipy's `mannwhitneyu(method="asymptotic")`) — which in a
        far tail is orders of magnitude too large (9 images ranked first of 7,009: 2.1e-7 for the exact
        1.8e-29; review); NaN when a side is empty."""
        inside, outside = self.counts(positive)
        m, n = int(inside.sum()), int(outside.sum())
        if m == 0 or n == 0 or self.has_nan:
            return float("nan")
        u = self.u_statistic(inside)
        tail, side = min(u, m * n - u), min(m, n)
        arrangements = (math.lgamma(m + n + 1) - math.lgamma(m + 1) - math.lgamma(n + 1)) / math.log(10)
        if self.tie_term == 0 and side * tail <= EXACT_WORK and arrangements <= 300:
            return _exact_p(u, m, n)
        total = m + n
        spread = math.sqrt(m * n / 12 * ((total + 1) - self.tie_term / (total * (total - 1))))
        if spread == 0:  # every score tied: no evidence either way
            return 1.0
        z = (max(u, m * n - u) - m * n / 2 - 0.5) / spread
        from scipy import stats

        return float(min(1.0, 2 * stats.norm.sf(z)))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` as a detector of `positive`, from the Mann-Whitney U.

    Ties count one half (average ranks), matching the pairwise definition P(s+ > s-) + P(s+ = s-)/2.
    NaN when either class is empty, where the AUROC is undefined.
    """
    return _RankedPool(scores).auroc(positive)


INTERVAL_FEWEST = 10
"""Images a class needs for an AUROC interval: with fewer, DeLong's normal approximation covers far
less than it says (simulated, a group against 300 others: 44–68% "95%" coverage at 2 images; the
logit interval below, 83–91% at 5 and 84–94% at 10)."""
EXACT_WORK = 4_000_000
"""The most coefficients `_exact_p` may compute (the smaller side × the tail's length; ≈ 25 ms, a
table of 15 groups within a stroke's time): past it, and where the arrangements outnumber a float
(C(m + n, m) > 10³⁰⁰), the p-value is asymptotic. A far tail, where the approximation fails, is short."""


def auroc_interval(scores: np.ndarray, positive: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of `auroc(scores, positive)`: DeLong's variance (as pROC's `ci.auc`),
    on the logit scale (Qin & Hotilovac 2008), which keeps it inside (0, 1) and covers as it says
    near an AUROC of 1, where the plain interval falls short (at 0.98 with 30 images against 300:
    81% coverage plain, 89% on the logit scale; 100 images: 89% and 94%). NaN where it would mislead:
    a class of fewer than `INTERVAL_FEWEST` images, and a complete separation or all scores tied
    (an AUROC of 0 or 1, or no variance), where the approximation gives an interval of no width."""
    return _RankedPool(scores).auroc_interval(positive, level)


def _exact_p(u: float, m: int, n: int) -> float:
    """The exact two-sided p-value of a Mann–Whitney U of m against n untied scores: twice the null
    probability of a U as far from m·n/2, counted as Mann and Whitney did (1947) — the number of
    arrangements with U = k is the coefficient of q^k in the Gaussian binomial [m+n choose m]_q =
    ∏ (1 − q^(n+i)) / (1 − q^i), i = 1..m, needed only up to the observed tail. scipy's exact method
    gives the same values (to 1e-12 in a trial; it stops at 8 images a side) but took 37 s for 8
    images against 10,000 and minutes against 100,000; against exact integer counts these float sums
    were within 4e-16 up to 200 images a side. The normal approximation gave 2.7e-3 for 3 top-ranked
    images of 7,003, whose exact p-value is 2 / C(7003, 3) = 3.5e-11 (statistics review)."""
    m, n = min(m, n), max(m, n)
    size = int(min(u, m * n - u)) + 1  # the tail below the observed U (the null is symmetric)
    counts = np.zeros(size)
    counts[0] = 1.0
    for i in range(1, m + 1):
        if n + i < size:  # × (1 − q^(n+i)), from the coefficients before it
            counts[n + i :] -= counts[: size - n - i].copy()
        # ÷ (1 − q^i): a running sum along each residue class mod i
        padded = np.concatenate([counts, np.zeros(-size % i)])
        counts = padded.reshape(-1, i).cumsum(axis=0).ravel()[:size]
    return min(1.0, 2 * float(counts.sum()) / math.comb(m + n, m))


def _q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values over the finite ones (a table of 15 findings makes 15 tests)."""
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        from scipy import stats

        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    return q


def tested_groups(groups: pd.DataFrame) -> pd.DataFrame:
    """The groups of a value: all but `MISSING`, whose images are described, not tested (an unknown
    label is no other label) — what `group_table` compares, and what a page may offer to group by."""
    return groups.drop(columns=MISSING, errors="ignore")


def group_table(scores: np.ndarray, groups: pd.DataFrame) -> pd.DataFrame:
    """One row per group: n, median, mean, std, AUROC with its 95% DeLong interval, and the
    Mann-Whitney p-value of the score, group vs the other images in any group (an image in none, e.g.
    one without a value in a present/absent split, is left out), with the Benjamini–Hochberg q-value
    over the table's groups that have one. The images without a value (the group `MISSING`) are
    described, not compared: an unknown label is no other label, as an unknown finding is no absent
    one — they are in no other group's rest, and their own row has no AUROC, p or q.

    Sorted by AUROC descending so the groups the query region best picks out come first.
    Refuses scores that are not finite: one NaN would make every group's AUROC and p-value NaN.
    """
    scores = np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite: no statistics of them")
    known = tested_groups(groups)
    grouped = known.to_numpy(dtype=bool).any(axis=1) if len(known.columns) else np.zeros(len(scores), bool)
    pool = _RankedPool(scores[grouped])
    rows = []
    for name in groups.columns:
        member = groups[name].to_numpy(dtype=bool)
        inside = pd.Series(scores[member])
        compared = name != MISSING
        low, high = pool.auroc_interval(member[grouped], 0.95) if compared else (np.nan, np.nan)
        rows.append(
            {
                "group": name,
                "n": int(member.sum()),
                "median": inside.median(),
                "mean": inside.mean(),
                "std": inside.std(),
                "auroc": pool.auroc(member[grouped]) if compared else np.nan,
                "auroc_low": low,
                "auroc_high": high,
                "p_value": pool.p_value(member[grouped]) if compared else np.nan,
            }
        )
    table = pd.DataFrame(rows, columns=GROUP_TABLE_COLUMNS[:-1])
    table["q_value"] = _q_values(table["p_value"].to_numpy(dtype=float))
    return table.sort_values("auroc", ascending=False, na_position="last", kind="stable").reset_index(
        drop=True
    )


def long_scores(scores: np.ndarray, groups: pd.DataFrame) -> pd.DataFrame:
    """Tidy (index, group, score) rows for box/violin/strip plots, group by group in the groups'
    order; an image appears once per group it is in. Positional: a group may be named anything,
    "index" and "score" too."""
    group, image = np.nonzero(groups.astype(bool).to_numpy().T)
    return pd.DataFrame(
        {
            "index": groups.index.to_numpy()[image],
            "group": groups.columns.to_numpy(dtype=object)[group],
            "score": np.asarray(scores, dtype=float)[image],
        }
    )


def rank_agreement(scores_a: np.ndarray, scores_b: np.ndarray, k: int) -> dict:
    """How similarly two models rank the same images: top-k overlap, Spearman rho and Kendall tau.

    k is capped at the number of images so identical rankings always overlap fully.
    """
    scores_a = np.asarray(scores_a, dtype=float)
    scores_b = np.asarray(scores_b, dtype=float)
    k = min(k, scores_a.size)
    top_a = np.argsort(-scores_a, kind="stable")[:k]
    top_b = np.argsort(-scores_b, kind="stable")[:k]
    overlap = np.intersect1d(top_a, top_b).size / k if k > 0 else float("nan")
    from scipy import stats

    return {
        "topk_overlap": float(overlap),
        "spearman": float(stats.spearmanr(scores_a, scores_b).statistic),
        "kendall": float(stats.kendalltau(scores_a, scores_b).statistic),
    }


def repeated_columns(manifest: pd.DataFrame) -> list[str]:
    """The manifest's columns (not `path`) in which some images share a value and not all do:
    what a search can leave out the query's fellows by (a patient, a study, a source video)."""
    out = []
    for column in manifest.columns:
        values = manifest[column].dropna()
        if column != "path" and 1 < values.nunique() < len(values):
            out.append(str(column))
    return out


def column_summary(
    manifest: pd.DataFrame, label_col: str | None = None, domain_col: str | None = None
) -> list[dict]:
    """What each manifest column (but `path`) offers to group by: its role, its number of distinct
    values (as grouping sees them: true/false in any case alike, missing as one value) and, for the
    label and domain columns and every true/false (finding) column, how many images have each value
    — per finding for '|'-joined values, most frequent first. JSON-able."""
    summary = []
    for column in manifest.columns.drop("path", errors="ignore"):
        values = _labels(manifest[column])
        boolean = set(values) <= {"True", "False", MISSING} and not (values == MISSING).all()
        role = {label_col: "label", domain_col: "domain"}.get(column, "finding" if boolean else None)
        distinct = int(values.str.split(SEPARATOR).explode().nunique())  # '|'-joined: each finding once
        entry: dict = {"column": column, "role": role, "distinct": distinct}
        if role is not None:
            counts = label_groups(manifest, column).sum().sort_values(ascending=False, kind="stable")
            entry["counts"] = {str(value): int(n) for value, n in counts.items()}
        summary.append(entry)
    return summary
