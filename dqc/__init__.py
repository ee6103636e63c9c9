"""Decentralized quality control for the travelling model (Souza et al. 2025).

The method, the data contract and where we differ from the authors: docs/method.md.

Modules, one job each:

- `defaults`: every default of the method and of the runs (e, R, batch size, seeds, criterion).
- `errors`: `DQCError`, the one exception a script turns into one `error:` line.
- `io`: atomic file writing (text, CSV, JSON, NIfTI, checkpoints); a library error's reason.
- `runtime`: the Keras backend, chosen before Keras starts and named when it starts computing;
  the quiet start (TensorFlow's start-up lines left out); `setup_runtime` (dtype policy and
  seeds), called first by every run.
- `cli`: what every script shares: `run_main` (process setup, one-line errors), the common flags.
- `commands`: the installed commands (`dqc-train`, `dqc-qc`, ...; pyproject.toml).
- `scripts`: the five folder scripts' code (package: `train`, `dirty`, `qc`, `infer`, `harmful`).
- `progress`: progress bars (tqdm), silent when not wanted.
- `timing`: named stopwatches summed over a run (where the time goes).
- `data`: the data contract: CSV tables and the one image check for every NIfTI read.
- `volumes`: images in memory, read once and served as batches (uint8 kept, streaming).
- `model`: the SFCN-like encoder and sigmoid classifier, their width and intensity options.
- `trainer`: one model and its Adam: train step, batched prediction, snapshot and restore.
- `checkpoint`: per-cycle model and state files, written atomically, loaded to continue.
- `authors`: the authors' Keras 2 `.h5` model files in (converted to our layout) and out.
- `export`: `python -m dqc.export --authors`: our models in the authors' `.h5` layout.
- `travel`: the travelling loop, written once: cycles, centers, local epochs, batches.
- `criteria`: the harm criteria, one class each (parameters, needs, self-set thresholds).
- `qc`: the verification / revisit / elimination policy and its calibration (pure numpy).
- `qc_report`: what a QC run writes and prints: log, per-image table, summary.
- `qc_page`: NAME_report.html, the QC run's self-contained page (and each center's own).
- `runs`: the paper's three runs (standard, dirty baseline, quality control) from the pieces.
- `metrics`: inference metrics, overall and per sex and age group.
- `inference`: scores and metrics of every saved cycle on a test set, and their files.
- `plots`: the figures: metrics across cycles, the QC log, image montages and mosaics.
- `browser`: a headless Chromium, when installed: a page's screenshot, its DOM.
- `harmful`: harmful-image generators and the scenario builder (harmful centers and images).
- `cohort`: `python -m dqc.cohort`: the embedded synthetic multi-center PD/HC cohort.
- `detectability`: `python -m dqc.detectability`: can a criterion see harm on this data.
- `bench`: `python -m dqc.bench`: where a QC cycle's time goes, fast path against naive.
- `demo`: `python -m dqc.demo`: the paper's experiment end to end on the embedded cohort.
- `report`: the demo's report (README.md with the findings, summary.json) from its files.
- `readme`: README.md's demo figures, generated from the demo's summary.json (`make docs`).
- `study`: `python -m dqc.study`: the demo's scenarios over cohort seeds, one table and plot.
- `federated`: quality control across machines on Flower (package):
  - `federated.__main__`: `python -m dqc.federated simulate|deploy|worker|app-dir`.
  - `federated.messages`: what travels between server and node, and nothing else.
  - `federated.server`: the roster, the remote step, verification at the centers, ServerApp.
  - `federated.replies`: the one check of every node reply (hello, step, verify).
  - `federated.runconfig`: the server's run config, checked, and the run specs built from it.
  - `federated.inprocess`: server and nodes in one process, no Ray (tests, debugging).
  - `federated.node`: a center's images, one training step, the tally of its validation set.
  - `federated.simulate`: Simulation Engine: one simulated node per center of a CSV.
  - `federated.loopback`: Deployment Engine on 127.0.0.1: SuperLink, SuperNodes, TLS, auth.
  - `federated.app`: the Flower app (pyproject.toml; `dqc_app` ServerApp and ClientApp).
"""

__version__ = "0.1.0"
