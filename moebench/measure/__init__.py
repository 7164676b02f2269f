"""Measurement: speed and memory (`speed`), and the logic of the bench commands.

Lives here: `speed` (warm up, synchronise, time; prefill, decode, latency, memory), `bench`
(unpruned vs pruned vs skipping), `select_bench` (select methods with and without offloading),
`overhead` (pruned_moe vs hf wall time) and `naee_bench` (NAEE enumeration by recombination vs
re-forward). Imports `moebench.eval`, `moebench.method` and below.
"""
