"""A report holds the sections its study has data for: a small study's report has no empty headings
(no published comparison, no calibration-domain effect, no figure it could not draw), in report.md
and in the PDF alike, and names what it left out and why."""

from __future__ import annotations

import itertools
import re

import pytest
from test_report import make_results

from moebench.cli import main
from moebench.report import pdf


@pytest.fixture
def pdf_blocks(monkeypatch):
    """The block titles of every PDF written, in order (the PDF is still written)."""
    seen = []
    write = pdf.write_pdf

    def capture(path, title, blocks, figures, label):
        seen.append(([b.title for b in blocks], {b.title: b for b in blocks}, [f[0] for f in figures]))
        return write(path, title, blocks, figures, label)

    monkeypatch.setattr(pdf, "write_pdf", capture)
    return seen


def _headings(text: str) -> list[str]:
    return re.findall(r"^#{2,3} (.+)$", text, re.M)


def _no_empty_section(text: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    for here, after in itertools.pairwise(lines):
        if here.startswith("## "):
            assert not after.startswith("## "), f"empty section {here!r}"
    assert not lines[-1].startswith("#")


def test_small_report_leaves_out_sections_without_data(tmp_path, pdf_blocks):
    folder = make_results(str(tmp_path / "results"), small=True)  # unpruned + one reap cell, no domain calibration
    assert main(["report", folder, "--out", str(tmp_path / "reports")]) == 0
    text = (tmp_path / "reports" / "toy" / "report.md").read_text()
    headings = _headings(text)
    top = [h for h in headings if not h.startswith("Figure ")]
    assert top == ["Settings", "Main table", "Figures", "Appendix A: per-task scores (%)", "Not in this report",
                   "Files"]
    _no_empty_section(text)
    assert "not drawn" not in text and "Skipped" not in text
    assert "No cell of this study matches" not in text.split("## Not in this report")[0]
    left = text.split("## Not in this report")[1].split("## Files")[0]
    items = re.findall(r"^- ([^:]+): ", left, re.M)
    assert items == ["Measured beside published", "Accuracy before and after recovery training",
                     "Calibration-domain effect", "Kept-expert maps",
                     "Published numbers"]  # each once: the calibration effect's figure and table are one entry
    assert "Appendix B" not in text  # no published numbers concern the testbed models
    ((titles, blocks, figures),) = pdf_blocks
    assert titles == ["Main table", "Appendix A: per-task scores (%)", "Not in this report"]
    left_pdf = blocks["Not in this report"].paragraphs
    assert [p.split(":")[0] for p in left_pdf[1:]] == items
    assert len(figures) == len(re.findall(r"^### Figure \d+: ", text, re.M)) == 6


def test_full_report_keeps_the_sections_it_has_data_for(tmp_path, pdf_blocks):
    folder = make_results(str(tmp_path / "results"))
    assert main(["report", folder, "--out", str(tmp_path / "reports")]) == 0
    text = (tmp_path / "reports" / "toy" / "report.md").read_text()
    top = [h for h in _headings(text) if not h.startswith("Figure ")]
    assert top == ["Settings", "Main table", "Figures", "Calibration-domain effect", "Appendix A: per-task scores (%)",
                   "Not in this report", "Files"]
    _no_empty_section(text)
    left = text.split("## Not in this report")[1].split("## Files")[0]
    assert re.findall(r"^- ([^:]+): ", left, re.M) == ["Measured beside published",
                                                       "Accuracy before and after recovery training",
                                                       "Published numbers"]  # no recovered cells
    ((titles, _, figures),) = pdf_blocks
    assert titles == ["Main table", "Calibration-domain effect", "Appendix A: per-task scores (%)",
                      "Not in this report"]
    assert len(figures) == 8
