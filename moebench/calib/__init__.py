"""Stats: calibration sources, the statistics pass over an MoE model, and their on-disk cache.

Lives here: `sources` (calibration data: presets, hub, files, registered sources such as the
testbed's), `stats` (one pass through the model collecting statistic groups per MoE layer) and
`cache` (statistics stored per model, calibration and settings). Imports `moebench.moe` and
`moebench.util` only.
"""
