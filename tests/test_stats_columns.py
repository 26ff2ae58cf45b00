"""`vfs.stats.column_summary`: what `vfs info` lists about a manifest's columns to choose "group by"."""

import pandas as pd

from vfs.stats import column_summary


def test_counts_for_label_domain_and_finding_columns():
    manifest = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png", "d.png"],
            "label": ["Cardiomegaly|Effusion", "No Finding", "Cardiomegaly|", None],
            "view": ["PA", "AP", "PA", "PA"],
            "cardiomegaly": ["true", "False", "TRUE", "false"],  # as read from a CSV
            "effusion": [True, False, False, False],
            "patient_id": [7, 7, 8, 9],
        }
    )
    summary = {
        entry["column"]: entry for entry in column_summary(manifest, label_col="label", domain_col="view")
    }
    assert list(summary) == ["label", "view", "cardiomegaly", "effusion", "patient_id"]  # no path
    assert summary["label"] == {
        "column": "label",
        "role": "label",
        "distinct": 4,
        "counts": {"Cardiomegaly": 2, "(missing)": 1, "Effusion": 1, "No Finding": 1},
    }  # one count per finding, and the distinct values are the findings too (not 4 strings by chance)
    wider = manifest.assign(label=["Cardiomegaly|Effusion", "Effusion|Mass", "Mass|Cardiomegaly", "Mass"])
    assert column_summary(wider, label_col="label")[0]["distinct"] == 3
    assert summary["view"]["counts"] == {"PA": 3, "AP": 1} and summary["view"]["role"] == "domain"
    assert summary["cardiomegaly"] == {
        "column": "cardiomegaly",
        "role": "finding",
        "distinct": 2,
        "counts": {"False": 2, "True": 2},
    }
    assert summary["effusion"]["counts"] == {"False": 3, "True": 1}
    assert summary["patient_id"] == {"column": "patient_id", "role": None, "distinct": 3}


def test_without_label_or_domain_columns():
    manifest = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", "y"]})
    assert column_summary(manifest) == [{"column": "label", "role": None, "distinct": 2}]
