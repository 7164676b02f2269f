"""`moebench report` builds folders from the study field of the tables only when it is a plain name."""

from __future__ import annotations

import os

import pandas as pd
from test_report import make_results

from moebench.cli import main


def test_a_study_field_that_is_not_a_folder_name_is_refused(tmp_path, capsys):
    folder = make_results(str(tmp_path / "results"), small=True)
    runs = os.path.join(folder, "tables", "runs.csv")
    pd.read_csv(runs).assign(study="<b>st</b>").to_csv(runs, index=False)
    out = tmp_path / "reports"
    assert main(["report", folder, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "study name (the 'study' field of cell.json) '<b>st</b>' cannot be a folder name" in err
    assert not out.exists() or os.listdir(out) == []
