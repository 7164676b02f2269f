"""Cells and grids: study specs, one cell per process, executors, tidy tables.

Lives here: `spec` (study YAML -> `Study` of frozen `Cell`s), `validate` (every problem of a spec at
once), `cell` (one cell in its own process: evaluate, measure, write), `runner` (the resumable grid),
`executors` (local and Slurm) and `results` (the runs / scores / latency tables). Imports
`moebench.measure`, `moebench.eval`, `moebench.method` and below; never `moebench.report` or the CLI.
"""
