import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from vfs import stats


def brute_force_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        positive = rng.random(40) < 0.4
        assert stats.auroc(scores, positive) == pytest.approx(brute_force_auroc(scores, positive))


def test_auroc_separation_and_empty_class():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    assert stats.auroc(scores, np.array([False, False, True, True])) == 1.0
    assert stats.auroc(scores, np.array([True, True, False, False])) == 0.0
    assert np.isnan(stats.auroc(scores, np.zeros(4, dtype=bool)))
    assert np.isnan(stats.auroc(scores, np.ones(4, dtype=bool)))
    for wrong in (np.ones(6, bool), np.ones(3, bool)):  # one per score: 6 gave an AUROC (review)
        with pytest.raises(ValueError, match=f"{wrong.size} true/false values for 4 scores"):
            stats.auroc(scores, wrong)
        with pytest.raises(ValueError, match=f"{wrong.size} true/false values for 4 scores"):
            stats.auroc_interval(scores, wrong)


NIH = pd.DataFrame(
    {"finding": ["Cardiomegaly|Effusion", "No Finding", "Effusion", "Cardiomegaly"]}, index=[10, 11, 12, 13]
)


def test_label_groups_multi_label():
    groups = stats.label_groups(NIH, "finding")
    assert sorted(groups.columns) == ["Cardiomegaly", "Effusion", "No Finding"]
    assert (groups.index == NIH.index).all()
    assert groups.dtypes.eq(bool).all()
    assert groups["Cardiomegaly"].tolist() == [True, False, False, True]
    assert groups["Effusion"].tolist() == [True, False, True, False]
    assert groups["No Finding"].tolist() == [False, True, False, False]


def test_label_groups_plain_categories_with_missing():
    records = pd.DataFrame({"view": ["PA", "AP", "PA", None]})
    groups = stats.label_groups(records, "view")
    assert sorted(groups.columns) == ["(missing)", "AP", "PA"]
    assert groups["PA"].tolist() == [True, False, True, False]
    assert groups["(missing)"].tolist() == [False, False, False, True]
    assert groups.sum(axis=1).eq(1).all()


@pytest.mark.parametrize(
    "values", [[True, False, True], ["true", "FALSE", "True"], np.array([1, 0, 1], dtype=bool)]
)
def test_label_groups_booleans(values):
    groups = stats.label_groups(pd.DataFrame({"flag": values}), "flag")
    assert sorted(groups.columns) == ["False", "True"]
    assert groups["True"].tolist() == [True, False, True]


def test_a_blank_cell_leaves_a_true_false_column_one_finding():
    """A blank cell is missing before true / false is recognised: it split the rest by case (review)."""
    records = pd.DataFrame({"flag": ["true", "false", "TRUE", " ", "False"]})
    groups = stats.label_groups(records, "flag")
    assert list(groups.columns) == ["(missing)", "False", "True"]
    assert groups["True"].tolist() == [True, False, True, False, False]
    assert stats.column_summary(records)[0]["role"] == "finding"


def test_presence():
    assert stats.presence(NIH, "finding", "Cardiomegaly").tolist() == [True, False, False, True]
    absent = stats.presence(NIH, "finding", "Hernia")
    assert absent.tolist() == [False] * 4
    assert (absent.index == NIH.index).all()


def test_group_table_columns_sorting_and_p_values():
    scores = np.array([0.9, 0.1, 0.5, 0.8])
    groups = stats.label_groups(NIH, "finding")
    table = stats.group_table(scores, groups)
    assert list(table.columns) == [
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
    ]
    assert table["auroc"].is_monotonic_decreasing
    assert table["group"].iloc[0] == "Cardiomegaly"
    for row in table.itertuples():
        member = groups[row.group].to_numpy()
        expected = sps.mannwhitneyu(scores[member], scores[~member], alternative="two-sided").pvalue
        assert row.p_value == pytest.approx(expected)
        assert row.n == member.sum()
        assert row.median == pytest.approx(np.median(scores[member]))
    cardio = table.set_index("group").loc["Cardiomegaly"]
    assert cardio["auroc"] == 1.0
    assert cardio["mean"] == pytest.approx(0.85)


def test_group_table_empty_group_has_nan_statistics():
    groups = pd.DataFrame({"all": [True, True], "none": [False, False]})
    table = stats.group_table(np.array([0.2, 0.4]), groups).set_index("group")
    assert table.loc["none", "n"] == 0
    assert np.isnan(table.loc["none", "median"])
    assert table[["auroc", "p_value"]].isna().all().all()
    assert table.loc["all", "median"] == pytest.approx(0.3)


def test_long_scores_repeats_multi_label_images():
    scores = np.array([0.9, 0.1, 0.5, 0.8])
    long = stats.long_scores(scores, stats.label_groups(NIH, "finding"))
    assert list(long.columns) == ["index", "group", "score"]
    assert len(long) == 5  # image 10 is in two groups
    assert sorted(long.loc[long["index"] == 10, "group"]) == ["Cardiomegaly", "Effusion"]
    assert long.loc[long["index"] == 10, "score"].eq(0.9).all()


@pytest.mark.parametrize("name", ["index", "score", "__score", "__member", "group"])
def test_long_scores_takes_a_group_named_like_its_own_columns(name):
    """A label is the user's word: one named "index" broke the Distributions page's plot."""
    groups = stats.label_groups(pd.DataFrame({"label": [name, "other", name]}, index=[7, 8, 9]), "label")
    long = stats.long_scores(np.array([0.1, 0.2, 0.3]), groups)
    got = sorted(zip(long["index"], long["group"], long["score"]))
    assert got == [(7, name, 0.1), (8, "other", 0.2), (9, name, 0.3)]
    assert stats.long_scores(np.array([0.1]), pd.DataFrame(index=[0])).empty  # no group: no rows


def test_rank_agreement():
    scores = np.random.default_rng(1).random(50)
    same = stats.rank_agreement(scores, scores, k=10)
    assert same["topk_overlap"] == 1.0
    assert same["spearman"] == pytest.approx(1.0)
    assert same["kendall"] == pytest.approx(1.0)
    reversed_ = stats.rank_agreement(scores, -scores, k=10)
    assert reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["topk_overlap"] == 0.0
    assert stats.rank_agreement(scores, scores, k=500)["topk_overlap"] == 1.0


def test_presence_groups_split_one_finding():
    from vfs.stats import is_multilabel, presence_groups

    records = pd.DataFrame(
        {"label": ["Cardiomegaly|Effusion", "No Finding", "Effusion"], "sex": ["M", "F", "M"]}
    )
    assert is_multilabel(records, "label") and not is_multilabel(records, "sex")
    g = presence_groups(records, "label", "Effusion")
    assert list(g.columns) == ["True", "False"]
    assert g["True"].tolist() == [True, False, True] and g["False"].tolist() == [False, True, False]


def test_label_groups_drop_empty_findings():
    records = pd.DataFrame({"finding": ["Effusion|", "|Mass||Nodule", "", "  ", "Mass | | Effusion"]})
    groups = stats.label_groups(records, "finding")
    assert sorted(groups.columns) == ["(missing)", "Effusion", "Mass", "Nodule"]
    assert groups["(missing)"].tolist() == [False, False, True, True, False]
    assert groups["Mass"].tolist() == [False, True, False, False, True]


def test_a_present_absent_split_leaves_out_images_without_a_value():
    """An unknown finding is not an absent one: such images are in neither group nor in either's test."""
    records = pd.DataFrame(
        {"finding": ["Cardiomegaly", None, "No Finding", "Cardiomegaly|Effusion", None, "Mass"]}
    )
    scores = np.array([0.9, 0.95, 0.2, 0.7, 0.1, 0.3])
    groups = stats.presence_groups(records, "finding", "Cardiomegaly")
    assert groups["True"].tolist() == [True, False, False, True, False, False]
    assert groups["False"].tolist() == [False, False, True, False, False, True]
    table = stats.group_table(scores, groups).set_index("group")
    assert table.loc["False", "n"] == 2
    assert table.loc["True", "auroc"] == 1.0  # 0.9 and 0.7 above 0.2 and 0.3; the unknown 0.95 left out
    expected = sps.mannwhitneyu([0.9, 0.7], [0.2, 0.3], alternative="two-sided").pvalue
    assert table.loc["True", "p_value"] == pytest.approx(expected)


def test_images_without_a_label_are_described_not_compared():
    """Every group's test leaves out the unlabelled images, as a present / absent split does: one
    finding got two AUROCs, the unlabelled (low) scores counted as its absence in one (review);
    their own row has no test and no place in the Benjamini–Hochberg family."""
    rng = np.random.default_rng(3)
    records = pd.DataFrame({"f": ["A"] * 15 + ["B"] * 15 + [None] * 15})
    scores = np.r_[rng.normal(1, 1, 15), rng.normal(0, 1, 15), rng.normal(-2, 0.5, 15)]
    every = stats.group_table(scores, stats.score_groups(records, "f")[0]).set_index("group")
    split = stats.group_table(scores, stats.score_groups(records, "f", "A")[0]).set_index("group")
    assert (
        every.loc["A", "auroc"] == split.loc["True", "auroc"] == stats.auroc(scores[:30], np.arange(30) < 15)
    )
    expected = sps.mannwhitneyu(scores[:15], scores[15:30], method="exact").pvalue
    assert every.loc["A", "p_value"] == pytest.approx(expected) == split.loc["True", "p_value"]
    missing = every.loc["(missing)"]
    assert missing["n"] == 15 and missing["median"] == pytest.approx(np.median(scores[30:]))
    assert missing[["auroc", "auroc_low", "auroc_high", "p_value", "q_value"]].isna().all()
    assert every.loc["A", "q_value"] == pytest.approx(expected)  # a family of two equal p-values


def brute_force_delong(scores, positive, z=1.959963984540054):
    """DeLong's interval from the pairwise kernel ψ(x, y) = 1[x > y] + ½·1[x = y] written out, on
    the logit scale."""
    x, y = scores[positive], scores[~positive]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(np.var(v10, ddof=1) / x.size + np.var(v01, ddof=1) / y.size)
    a = psi.mean()
    logit, spread = np.log(a / (1 - a)), z * se / (a * (1 - a))
    return 1 / (1 + np.exp(-(logit - spread))), 1 / (1 + np.exp(-(logit + spread)))


def test_auroc_interval_is_delongs_on_the_logit_scale():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 8, size=80).astype(float)  # ties
        positive = rng.random(80) < 0.3
        positive[:10], positive[10:20] = True, False
        low, high = stats.auroc_interval(scores, positive)
        assert (low, high) == pytest.approx(brute_force_delong(scores, positive))
        assert 0 < low <= stats.auroc(scores, positive) <= high < 1
    nine = np.arange(40) < 9
    assert np.isnan(stats.auroc_interval(rng.random(40), nine)).all()  # too few images to cover
    assert not np.isnan(stats.auroc_interval(rng.random(40), np.arange(40) < 10)).any()
    ten = np.arange(40) < 10
    separated = np.where(ten, 1.0, 0.0) + rng.random(40) * 0.5  # AUROC 1: DeLong's variance 0
    assert np.isnan(stats.auroc_interval(separated, ten)).all()
    assert np.isnan(stats.auroc_interval(np.ones(40), ten)).all()  # all tied
    with_nan = rng.random(40)
    with_nan[30] = np.nan
    assert np.isnan(stats.auroc(with_nan, ten)) and np.isnan(stats.auroc_interval(with_nan, ten)).all()


def test_a_tables_groups_ranked_once_are_each_groups_own_statistics():
    """`group_table` ranks the grouped images once for all its groups (it ranked them three times a
    group: 225 ms for 32 groups of 10,000 images); each row must stay what the group alone gives —
    overlapping groups, ties, an image in no group, the "(missing)" group out of every rest."""
    rng = np.random.default_rng(11)
    for _ in range(10):
        n = int(rng.integers(60, 400))
        scores = rng.integers(0, 25, n) / 4  # many ties
        groups = pd.DataFrame({f"g{i}": rng.random(n) < rng.uniform(0.05, 0.5) for i in range(4)})
        groups["(missing)"] = rng.random(n) < 0.1
        table = stats.group_table(scores, groups).set_index("group")
        grouped = groups.drop(columns="(missing)").to_numpy().any(axis=1)
        for name in groups.columns.drop("(missing)"):
            member = groups[name].to_numpy()[grouped]
            pool = scores[grouped]
            row = table.loc[name]
            assert row["auroc"] == pytest.approx(brute_force_auroc(pool, member), abs=1e-12)
            expected = sps.mannwhitneyu(pool[member], pool[~member], method="asymptotic").pvalue
            assert row["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
            if min(member.sum(), (~member).sum()) >= stats.INTERVAL_FEWEST:
                assert (row["auroc_low"], row["auroc_high"]) == pytest.approx(
                    brute_force_delong(pool, member)
                )
        untied = rng.permutation(n) + 0.5  # no ties, small: the exact null
        small = np.arange(n) < 6
        groups_small = pd.DataFrame({"small": small, "rest": ~small})
        expected = sps.mannwhitneyu(untied[small], untied[~small], method="exact").pvalue
        got = stats.group_table(untied, groups_small).set_index("group").loc["small", "p_value"]
        assert got == pytest.approx(expected, rel=1e-9)
    tied = pd.DataFrame({"a": np.arange(40) < 20, "b": np.arange(40) >= 20})
    assert stats.group_table(np.ones(40), tied)["p_value"].tolist() == [1.0, 1.0]  # as scipy: all tied


def test_a_small_groups_p_value_is_exact_in_a_large_table_and_in_time():
    """scipy's exact Mann–Whitney test for a side of ≤ 8 images took 41 s for 1 image against
    100,000 and minutes for 8 (trial); the normal approximation used instead was orders of magnitude
    off in the tail (3 top-ranked of 7,003: 2.7e-3 for 3.5e-11, review). The null is counted."""
    import math
    import time

    rng = np.random.default_rng(5)
    # ranked first: p = 2 / C(m + n, m) exactly — past scipy's 8 a side too (9 of 7,009: 2.1e-7 asymptotic)
    for m, n in ((3, 7000), (8, 99_992), (1, 50_000), (9, 7000), (40, 2000)):
        scores = np.r_[10 + rng.random(m), rng.random(n)]
        top = np.arange(m + n) < m
        t0 = time.perf_counter()
        table = stats.group_table(scores, pd.DataFrame({"top": top, "rest": ~top})).set_index("group")
        assert time.perf_counter() - t0 < 5
        assert table.loc["top", "p_value"] == pytest.approx(min(1, 2 / math.comb(m + n, m)), rel=1e-9)
        assert table.loc["rest", "p_value"] == table.loc["top", "p_value"]
    scores = rng.random(100_000)  # the tail reaching the middle: the whole null counted
    rare = np.arange(100_000) < 8
    t0 = time.perf_counter()
    p = (
        stats.group_table(scores, pd.DataFrame({"rare": rare, "rest": ~rare}))
        .set_index("group")
        .loc["rare", "p_value"]
    )
    assert time.perf_counter() - t0 < 5 and 0 < p <= 1
    for m, n, shift in (
        (1, 1, 0),
        (2, 3, 1),
        (5, 5, 2),
        (8, 8, 0.3),
        (8, 30, 3),
        (7, 500, 0.5),
        (5, 3000, 1),
    ):
        few = np.r_[rng.normal(shift, 1, m), rng.normal(0, 1, n)]  # as scipy's exact method
        exact = sps.mannwhitneyu(few[:m], few[m:], method="exact").pvalue
        groups = pd.DataFrame({"a": np.arange(m + n) < m, "b": np.arange(m + n) >= m})
        assert stats.group_table(few, groups).set_index("group").loc["a", "p_value"] == pytest.approx(
            exact, rel=1e-9
        )
    tied = np.r_[np.ones(3), np.arange(20.0)]  # ties: the asymptotic test with its tie correction
    groups = pd.DataFrame({"a": np.arange(23) < 3, "b": np.arange(23) >= 3})
    asymptotic = sps.mannwhitneyu(tied[:3], tied[3:], method="asymptotic").pvalue
    assert stats.group_table(tied, groups).set_index("group").loc["a", "p_value"] == pytest.approx(asymptotic)
    big = rng.random(3300)  # too many coefficients to count (300 × ~450,000): asymptotic
    groups = pd.DataFrame({"a": np.arange(3300) < 300, "b": np.arange(3300) >= 300})
    asymptotic = sps.mannwhitneyu(big[:300], big[300:], method="asymptotic").pvalue
    assert stats.group_table(big, groups).set_index("group").loc["a", "p_value"] == pytest.approx(asymptotic)


def test_group_table_refuses_scores_that_are_not_finite():
    groups = pd.DataFrame({"a": [True, False, True], "b": [False, True, False]})
    with pytest.raises(ValueError, match="1 scores are not finite"):
        stats.group_table(np.array([0.1, np.nan, 0.3]), groups)


def test_q_values_are_benjamini_hochberg_over_the_tables_groups():
    rng = np.random.default_rng(4)
    scores = rng.random(60)
    groups = pd.DataFrame({f"g{i}": rng.random(60) < 0.3 for i in range(5)} | {"none": np.zeros(60, bool)})
    scores[groups["g0"].to_numpy()] += 0.5
    table = stats.group_table(scores, groups).set_index("group")
    p = table["p_value"].drop("none")
    order = np.argsort(p.to_numpy())
    ranked = p.to_numpy()[order] * len(p) / np.arange(1, len(p) + 1)
    expected = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1)
    np.testing.assert_allclose(table.loc[p.index[order], "q_value"], expected)
    assert np.isnan(table.loc["none", "q_value"])


@pytest.mark.parametrize(
    "values",
    [
        1_700_000_000 + np.arange(1000.0),  # named "…000–…200" while holding up to …249 (trial)
        0.5 + np.arange(1000) * 1e-6,
        np.r_[np.zeros(500), np.arange(500.0)],  # a repeated value across a boundary
        np.array([0.0, 10.0]),  # fewer values than quartiles: no empty group
        -np.logspace(-3, 6, 777),
        np.r_[np.arange(1.0, 21.0), -np.inf],  # quantiles of −inf left the lowest group out (review)
        np.r_[np.arange(1.0, 21.0), -np.inf, np.inf],  # two of four groups, 12 of 22 images left out
    ],
)
def test_quartile_names_say_what_each_group_holds(values):
    from vfs.stats import quartile_groups

    groups = quartile_groups(pd.Series(values))
    assert groups.sum().sum() == len(values) and (groups.sum() > 0).all()
    for name in groups.columns:
        low, _, high = name.partition("–")
        held = values[groups[name].to_numpy()]
        assert float(low) == pytest.approx(held.min(), rel=1e-5, abs=1e-12)
        assert float(high or low) == pytest.approx(held.max(), rel=1e-5, abs=1e-12)


def test_grouping_columns_are_those_of_2_to_50_groups_then_numeric_ones_by_quartiles():
    records = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(60)],
            "id": [f"p{i}" for i in range(60)],  # one image a group
            "site": ["A"] * 59 + [None],  # one group and the missing
            "label": ["a|b", "c", None, "b|"] * 15,  # three findings
            "flag": [True, False] * 30,
            "age": np.arange(60.0),  # 60 groups of a value: by quartiles only
            "many": [f"v{i % 50}" for i in range(60)],  # 50: the most
            "odd": ["x|(missing)", "y"]
            * 30,  # a literal "(missing)" finding: dropped as tested_groups drops it
        }
    )
    assert [stats.group_count(records, c) for c in records.columns[1:]] == [60, 1, 3, 2, 60, 50, 2]
    assert stats.grouping_columns(records) == ["label", "flag", "many", "odd", "age (quartiles)"]
    assert stats.grouping_columns(records, most=49) == ["label", "flag", "odd", "age (quartiles)"]
    for column in ("label", "flag", "many", "odd"):
        assert (
            stats.group_count(records, column)
            == stats.tested_groups(stats.label_groups(records, column)).shape[1]
        )


def test_quartile_groups_of_a_numeric_column():
    from vfs.stats import QUARTILES, binnable_columns, column_groups, quartile_groups, score_groups

    records = pd.DataFrame(
        {"age": [20, 30, 40, 50, 60, 70, 80, 90, 100, None], "sick": [True, False] * 5, "n": [1] * 10}
    )
    groups = quartile_groups(records["age"])
    # each group's least and most; no age: the missing group, as grouping by the column has it (app review)
    assert list(groups.columns) == ["(missing)", "20–40", "50–60", "70–80", "90–100"]
    assert groups.sum().tolist() == [1, 3, 2, 2, 2] and groups.iloc[9].tolist() == [True] + [False] * 4
    ages = records["age"].astype("Int64")  # whole numbers with gaps, as a manifest reads them
    pd.testing.assert_frame_equal(quartile_groups(ages), groups)
    assert stats.tested_groups(groups).sum().tolist() == [3, 2, 2, 2]  # described, not tested
    assert binnable_columns(records) == ["age"]  # not a boolean, not a column of one value
    pd.testing.assert_frame_equal(column_groups(records, "age" + QUARTILES), groups)
    grouped, title = score_groups(records, "age" + QUARTILES)  # the page's and the notebook's
    pd.testing.assert_frame_equal(grouped, groups)
    assert title == "age (quartiles)"
    stamps = quartile_groups(pd.Series(1_700_000_000 + np.arange(40)))  # 7 digits alike: names apart
    assert list(stamps.columns) == [  # six digits named them all "1.7e+09–1.7e+09": one group was left
        "1700000000–1700000009",
        "1700000010–1700000019",
        "1700000020–1700000029",
        "1700000030–1700000039",
    ]
    assert stamps.sum().tolist() == [10, 10, 10, 10]
    assert list(column_groups(records, "sick").columns) == ["False", "True"]
