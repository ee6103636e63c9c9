"""Quality control: the harm rule and the verification / revisit / elimination policy.

Pure Python and numpy, no deep-learning import: training, evaluation, snapshot and restore
come in as callables, so the policy is the same whether a step runs here or on a hospital's
machine, and it can be tested with a stand-in evaluator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

#: Floating-point slack so that a rise exactly equal to the threshold is not harmful.
TOLERANCE = 1e-9

LOG_COLUMNS = ["Cycle", "Subject", "Study", "ACC", "FP", "FN", "PFP", "PFN", "Ignored"]


@dataclass(frozen=True)
class Evaluation:
    """The server's verdict data for one model state on the validation set."""

    acc: float
    fp: int
    fn: int
    fpr: float
    fnr: float


def evaluate_predictions(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                         legacy_rates: bool = False) -> Evaluation:
    """Accuracy, false positives/negatives and their rates at `threshold` (score >= t is PD).

    FPR = FP / number of HC, FNR = FN / number of PD. With `legacy_rates` the authors'
    denominators are used instead (FP / number of PD, FN / number of HC).
    """
    y = np.asarray(y_true).astype(int).reshape(-1)
    pred = (np.asarray(scores).reshape(-1) >= threshold).astype(int)
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    n_pd, n_hc = int(np.sum(y == 1)), int(np.sum(y == 0))
    fp_den, fn_den = (n_pd, n_hc) if legacy_rates else (n_hc, n_pd)
    return Evaluation(acc=float(np.mean(pred == y)), fp=fp, fn=fn,
                      fpr=fp / fp_den, fnr=fn / fn_den)


def is_harmful(new: Evaluation, reference: Evaluation, n_images: int, error: float) -> bool:
    """An update of n images is harmful when either rate rises by more than n * error."""
    limit = n_images * error + TOLERANCE
    return new.fpr - reference.fpr > limit or new.fnr - reference.fnr > limit


def per_image_tolerance_problems(n_hc: int, n_pd: int, error: float,
                                 legacy_rates: bool = False) -> list[str]:
    """Classes so small that one extra error raises a rate by more than `error`."""
    fp_den, fn_den = (n_pd, n_hc) if legacy_rates else (n_hc, n_pd)
    out = []
    for rate, den in (("false-positive", fp_den), ("false-negative", fn_den)):
        if den and 1 / den > error + TOLERANCE:
            out.append(f"one extra {rate} raises its rate by 1/{den} = {1 / den:.3f} > "
                       f"-error {error}")
    return out


@dataclass
class ImageRecord:
    """What quality control did with one training image."""

    study: str
    times_flagged: int = 0
    first_flagged_cycle: int | None = None
    revisit_cycle: int | None = None
    eliminated_cycle: int | None = None


@dataclass
class QCState:
    """Everything the policy carries from cycle to cycle (saved with each checkpoint)."""

    reference: Evaluation | None = None
    log: list[dict] = field(default_factory=list)
    schedule: dict[int, list[str]] = field(default_factory=dict)  # revisit cycle -> subjects
    images: dict[str, ImageRecord] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"reference": asdict(self.reference) if self.reference else None,
                "log": self.log,
                "schedule": {str(k): v for k, v in self.schedule.items()},
                "images": {k: asdict(v) for k, v in self.images.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "QCState":
        return cls(reference=Evaluation(**data["reference"]) if data["reference"] else None,
                   log=list(data["log"]),
                   schedule={int(k): list(v) for k, v in data["schedule"].items()},
                   images={k: ImageRecord(**v) for k, v in data["images"].items()})


Train = Callable[[str, list[str]], tuple[float, float]]
Evaluate = Callable[[Sequence[str]], Evaluation]
Event = Callable[[str], None]


class QualityControl:
    """Verification of every update, revisit after R cycles, elimination on a second harm.

    train(center, ids) makes one update; evaluate(ids) scores the model after an update of
    `ids` on the validation set; snapshot()/restore(s) undo an update exactly.
    """

    def __init__(self, train: Train, evaluate: Evaluate, snapshot: Callable[[], object],
                 restore: Callable[[object], None], *, error: float, revisit: int,
                 studies: dict[str, str], state: QCState | None = None,
                 on_event: Event | None = None):
        self.train, self.evaluate = train, evaluate
        self.snapshot, self.restore = snapshot, restore
        self.error, self.revisit = error, revisit
        self.state = state or QCState(images={s: ImageRecord(c) for s, c in studies.items()})
        self.on_event = on_event or (lambda message: None)
        self.cycle = 0

    # --- bookkeeping -----------------------------------------------------------------------
    def _log(self, subject: str, study: str, ev: Evaluation, ignored: bool) -> None:
        self.state.log.append({"Cycle": self.cycle, "Subject": subject, "Study": study,
                               "ACC": ev.acc, "FP": ev.fp, "FN": ev.fn, "PFP": ev.fpr,
                               "PFN": ev.fnr, "Ignored": int(ignored)})
        if not ignored:
            self.state.reference = ev

    def baseline(self) -> Evaluation:
        """Evaluate the loaded model; logged as cycle 0, subject n/a, the first reference."""
        self.cycle = 0
        ev = self.evaluate([])
        self._log("n/a", "n/a", ev, ignored=False)
        return ev

    def waiting(self) -> set[str]:
        return {s for subjects in self.state.schedule.values() for s in subjects}

    def eliminated(self) -> set[str]:
        return {s for s, r in self.state.images.items() if r.eliminated_cycle is not None}

    def select(self, center: str, ids: list[str]) -> list[str]:
        """A center's images for the regular pass: not eliminated, not waiting for a revisit."""
        skip = self.waiting() | self.eliminated()
        return [s for s in ids if s not in skip]

    # --- the policy ------------------------------------------------------------------------
    def _try(self, center: str, ids: list[str], subject: str) -> tuple[bool, float, float]:
        """Snapshot, train, evaluate, log; undo if harmful. Returns (harmful, loss, acc)."""
        snap = self.snapshot()
        loss, acc = self.train(center, ids)
        ev = self.evaluate(ids)
        harmful = is_harmful(ev, self.state.reference, len(ids), self.error)
        self._log(subject, center, ev, ignored=harmful)
        if harmful:
            self.restore(snap)
        return harmful, loss, acc

    def _flag(self, subject: str) -> ImageRecord:
        record = self.state.images[subject]
        record.times_flagged += 1
        if record.first_flagged_cycle is None:
            record.first_flagged_cycle = self.cycle
        return record

    def verify_batch(self, center: str, ids: list[str]) -> tuple[float, float]:
        """Regular pass: keep a harmless batch; else retry each image alone, flag the harmful."""
        harmful, loss, acc = self._try(center, ids, "batch")
        if not harmful:
            return loss, acc
        self.on_event(f"cycle {self.cycle}: batch of {len(ids)} at {center} flagged; "
                      "checking its images one by one")
        for subject in ids:
            if self._try(center, [subject], subject)[0]:
                record = self._flag(subject)
                record.revisit_cycle = self.cycle + self.revisit
                self.state.schedule.setdefault(record.revisit_cycle, []).append(subject)
                self.on_event(f"cycle {self.cycle}: {subject} ({center}) harmful; "
                              f"revisit in cycle {record.revisit_cycle}")
        return loss, acc

    def revisit_pass(self) -> None:
        """Images scheduled for this cycle train alone once more; harmful again: eliminated."""
        for subject in self.state.schedule.pop(self.cycle, []):
            record = self.state.images[subject]
            if self._try(record.study, [subject], subject)[0]:
                self._flag(subject)
                record.eliminated_cycle = self.cycle
                self.on_event(f"cycle {self.cycle}: {subject} ({record.study}) harmful again; "
                              "eliminated")
            else:
                self.on_event(f"cycle {self.cycle}: {subject} ({record.study}) passed its "
                              "revisit; back in training")

    # --- reporting -------------------------------------------------------------------------
    def status(self, subject: str) -> str:
        record = self.state.images[subject]
        if record.eliminated_cycle is not None:
            return "eliminated"
        return "pending" if subject in self.waiting() else "kept"
