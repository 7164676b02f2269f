"""Embedded offline testbed: tiny trained MoEs and synthetic multi-domain tasks.

- `DOMAINS`: the six synthetic domains; `calibration_texts(domain, n, seed)` draws calibration
  texts from the calibration split ("mix" or one domain).
- `resolve_model(name_or_path)`: a testbed model name -> its folder in the package.
- `moebench zoo list | train NAME | card NAME | build-tasks` on the command line.
"""

from moebench.testbed.data import calibration_texts
from moebench.testbed.domains import DOMAINS
from moebench.testbed.zoo import list_models, resolve_model

CALIBRATION_SOURCES: tuple[str, ...] = ("mix", *DOMAINS)

__all__ = ["CALIBRATION_SOURCES", "DOMAINS", "calibration_texts", "list_models", "resolve_model"]
