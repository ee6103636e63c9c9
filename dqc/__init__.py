"""Decentralized quality control for the travelling model (Souza et al. 2025).

Modules, one job each: `data` (CSV contract, NIfTI reading), `volumes` (in-memory images),
`model` (SFCN encoder + classifier, per-cycle files), `trainer` (one model + optimizer:
train step, batched evaluation, snapshot/restore), `travel` (the travelling loop),
`qc` (the harm rule and the QC policy), `cohort` (embedded synthetic cohort), `harmful`
(harmful-image generators), `metrics` (inference metrics), `cli` (shared flag handling).
"""

__version__ = "0.1.0"
