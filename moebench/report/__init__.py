"""Reports, paper figures, published numbers and the leaderboard, from a study's tidy tables.

`moebench report RESULTS_DIR` (`moebench.report.build`) writes ``reports/<study>/`` with
``report.md``, ``report.pdf``, figures (PNG and PDF) and booktabs LaTeX tables;
`moebench leaderboard` (`moebench.report.leaderboard`) writes ``reports/leaderboard.{md,html}``.
Numbers are defined in `moebench.report.tables`; published reference numbers live in
``papers/*.yaml`` (`moebench.report.published`).
"""
