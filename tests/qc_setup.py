"""A tiny cohort with a model pre-trained for a few cycles, as the QC runs need (paper: 10)."""

from __future__ import annotations

from pathlib import Path

from dqc.cohort import build_cohort
from dqc.runs import RunSpec, train_cycles

ROOT = Path(__file__).resolve().parents[1]
QC_SCRIPT = ROOT / "travelling_quality_control" / "enc_PD_quality_control.py"


def pretrained(root: Path, cycles: int = 1, epochs: int = 1, batch_size: int = 5,
               **cohort: object) -> dict:
    """Build a cohort in root/cohort and train cycles 0..cycles-1 into root/pre (prefix tm)."""
    params = dict(centers=6, n_train=24, n_val=12, n_test=6, downsample=8, seed=0)
    params.update(cohort)
    built = build_cohort(root / "cohort", verbose=False, **params)
    train_cycles(RunSpec(train_csv=str(built["train"]), out=str(root / "pre"), prefix="tm",
                         cycles=range(0, cycles), seed=40, epochs=epochs,
                         batch_size=batch_size, verbose=False, echo=lambda line: None))
    last = cycles - 1
    return {**built, "encoder": root / "pre" / f"tm_encoder_{last:03d}.keras",
            "classifier": root / "pre" / f"tm_classifier_{last:03d}.keras", "start": cycles}
