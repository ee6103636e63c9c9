"""Decentralized quality control for the travelling model (Souza et al. 2025).

Modules, one job each: `data` (CSV contract, NIfTI reading), `volumes` (in-memory images),
`model` (SFCN encoder + classifier, per-cycle files), `trainer` (one model + optimizer:
train step, batched evaluation, snapshot/restore), `travel` (the travelling loop),
`qc` (the harm criteria and the QC policy), `detectability` (can the criteria see harm:
candidate updates from one model state), `cohort` (embedded synthetic cohort), `harmful`
(harmful-image generators), `metrics` (inference metrics), `cli` (shared flag handling),
`demo` and `report` (the paper's experiment end to end).
"""

__version__ = "0.1.0"
