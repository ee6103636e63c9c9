"""The five scripts of the authors' folders, one module each (`parse_args`, `main`): the
folder scripts (`standard_travelling_model/enc_PD_train_distributed.py`, ...) and the installed
commands (`dqc-train`, ..., `dqc.commands`) run the same `main` through `dqc.cli.run_main`.

- `train`: the standard travelling model (clean baseline, pre-training).
- `dirty`: the dirty baseline (a pre-trained model continued on harmful data, no QC).
- `qc`: the travelling model with quality control.
- `infer`: metrics of every saved cycle on a test set.
- `harmful`: harmful images, one file or a whole scenario CSV.
"""
