"""Names from results are data, never markup: Markdown, LaTeX, HTML and the PDF show them as written."""

from __future__ import annotations

import re
import shutil
import subprocess

from report_data import cell, write_study

from moebench.cli import main
from moebench.report.latex import escape
from moebench.report.textfmt import md_escape

MODEL = "evil<script>alert(1)</script>|m_1%&#$x$"
METHOD = "<img src=x onerror=alert(1)>|_a_b%c&d#e$f"


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_and_latex_escaping_rules():
    assert md_escape("a|b") == r"a\|b" and md_escape("<script>") == "&lt;script&gt;"
    assert md_escape("testbed_arithmetic_quick") == "testbed_arithmetic_quick"  # inside a word: no emphasis
    assert md_escape("_x_") == r"\_x\_" and md_escape("*b* `c` [d](e) $f$") == r"\*b\* \`c\` \[d\](e) \$f\$"
    assert md_escape("a & b\nc") == "a &amp; b c" and md_escape("&lt;") == "&amp;lt;"
    assert escape("a_b 50% & #1 $x$ <i>|") == (r"a\_b 50\% \& \#1 \$x\$ \textless{}i\textgreater{}\textbar{}")
    assert escape("1.0 \u00b1 0.5") == r"1.0 \ensuremath{\pm} 0.5"


def test_hostile_model_and_method_names_reach_every_output_as_text(tmp_path):
    cells = [cell("base", "none", 0.0, 0.9, model=MODEL), cell("evil", METHOD, 0.5, 0.6, model=MODEL),
             cell("freq", "frequency", 0.5, 0.7, model=MODEL)]
    folder = write_study(str(tmp_path / "results"), cells, study="hostile")
    out = tmp_path / "reports"
    assert main(["report", folder, "--out", str(out)]) == 0
    assert main(["leaderboard", str(tmp_path / "results"), "--out", str(out)]) == 0
    for path in (out / "hostile" / "report.md", out / "leaderboard.md"):
        text = path.read_text()
        assert "<script" not in text and "<img" not in text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
        assert r"\|m_1%&amp;#\$x\$" in text and r"\|\_a_b%c&amp;d#e\$f" in text
        tables = re.findall(r"(?:^\|.*\n)+", text, re.M)  # every Markdown table keeps its column count
        assert tables and all("m_1" in t for t in tables)
        for table in tables:
            counts = {_unescaped_pipes(line) for line in table.splitlines()}
            assert len(counts) == 1, table
    tex = (out / "hostile" / "tables" / "main.tex").read_text()
    assert (r"evil\textless{}script\textgreater{}alert(1)\textless{}/script\textgreater{}\textbar{}m\_1\%\&\#\$x\$"
            in tex)
    assert r"\textless{}img src=x onerror=alert(1)\textgreater{}\textbar{}\_a\_b\%c\&d\#e\$f" in tex
    assert "<script" not in tex and "<img" not in tex
    page = (out / "leaderboard.html").read_text()
    assert "<script>alert" not in page and "<img" not in page and "&lt;script&gt;alert(1)" in page
    pdf = out / "hostile" / "report.pdf"
    assert pdf.stat().st_size > 10_000  # drawn without mathtext errors from the $ signs
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
        assert "m_1%&#$x$" in text and "onerror=alert(1)>|_a_b%c&d#e$f" in text
