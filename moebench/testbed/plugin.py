"""The testbed as a moebench plugin: its model names and calibration sources, registered on import.

Named by the entry point ``moebench.plugins: testbed`` (pyproject.toml), so `moebench.util.load_plugins`
imports it the first time a model name or a calibration source is resolved. Core modules never
import the testbed; they see it only through these registrations.
"""

from __future__ import annotations

from collections.abc import Iterator

from moebench.calib.sources import RegisteredSource, register_source
from moebench.moe.checkpoint import register_models
from moebench.testbed.data import calibration_texts
from moebench.testbed.domains import DOMAINS
from moebench.testbed.zoo import model_names, resolve_model


def _resolve(name: str) -> str | None:
    """A testbed model name -> its folder (raises when it is not trained yet); None for other names."""
    return resolve_model(name) if name in model_names() else None


def _texts(domain: str, seed: int) -> Iterator[str]:
    """Endless calibration texts of the embedded testbed, drawn in doubling prefixes."""
    done, n = 0, 64
    while True:
        yield from calibration_texts(domain, n, seed)[done:]
        done, n = n, 2 * n


SOURCE = RegisteredSource(
    prefix="testbed", names=("mix", *DOMAINS), texts=_texts, groups={"domains": tuple(DOMAINS)},
    descriptions={"testbed:mix": "all domains of the embedded offline testbed (the C4 analogue)",
                  "testbed:<domain>": f"one domain of the embedded testbed ({', '.join(DOMAINS)}; the MATH / "
                                      "code analogue)",
                  "testbed:domains": "every testbed domain, one statistics set each (select methods)"})

register_models(_resolve)
register_source(SOURCE)
