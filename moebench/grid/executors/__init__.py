"""Executors: run grid cells here or on a Slurm cluster."""

from moebench.grid.executors.local import *  # noqa: F403
from moebench.grid.executors.local import make_executor  # noqa: F401
