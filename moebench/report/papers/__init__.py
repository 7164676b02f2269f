"""Published numbers as data: one YAML file per paper (format in `moebench.report.published`).

A package only so that installs ship the YAML files with it.
"""
