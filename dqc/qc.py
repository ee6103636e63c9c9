"""Quality control: the verification / revisit / elimination policy, and the validation
figures it judges by (the criteria themselves: `dqc.criteria`).

Pure Python and numpy, no deep-learning import: training, evaluation, snapshot and restore
come in as callables, so the policy is the same whether a step runs here or on a hospital's
machine, and it can be tested with a stand-in evaluator.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

# LOG_COLUMNS, TOLERANCE and per_image_tolerance_problems: re-exported
from dqc.criteria import (LOG_COLUMNS, MIN_WINDOW, PRETRAINING_WINDOW,  # noqa: F401
                          TOLERANCE, Criterion, Rates, Verdict, at_least, center_floor,
                          per_image_tolerance_problems, rates_verdict)
from dqc.errors import DQCError

#: Keras clips predicted probabilities to [eps, 1 - eps] in binary cross-entropy.
BCE_EPSILON = 1e-7
#: The calibration's random stream: seeded by the run's seed and this, apart from the cycles'.
CALIBRATION_STREAM = 7919
#: The revisit's witnesses' random stream (`QualityControl.witnesses`).
WITNESS_STREAM = 7927
#: The confirmation window's calibration stream (`QualityControl.confirmation_window`).
CONFIRM_STREAM = 7933
#: The one-label window's calibration stream (`QualityControl.one_label_window`).
ONE_LABEL_STREAM = 7937
#: A lone image's witnesses' stream (`QualityControl.verify_lone`), apart from the revisits'.
LONE_STREAM = 7949


@dataclass(frozen=True)
class Evaluation:
    """The server's verdict data for one model state on the validation set.

    `pred` holds the 0/1 predictions in validation order as a '0'/'1' string (and `truth`
    the labels), so that a reference survives the JSON of a checkpoint and McNemar can pair
    its images with a candidate's.
    """

    acc: float
    fp: int
    fn: int
    fpr: float  # FP / HC (the authors': FP / PD, `legacy_rates`)
    fnr: float  # FN / PD (the authors': FN / HC)
    loss: float = math.nan  # binary cross-entropy, nats: NaN where only counts travelled
    auroc: float = math.nan
    pred: str = ""
    truth: str = ""


#: The figures of an update that was judged without the validation set (its own loss).
NOT_EVALUATED = Evaluation(math.nan, math.nan, math.nan, math.nan, math.nan)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Tally:
    """What one share of the validation set says about one model state: the parts that add
    up across centers into an `Evaluation` (`combine`).

    A center verifying its own images sends only this: the counts always; with `detail`
    "scores" also its scores sorted within each class (no id, no order: what the loss and
    the AUROC need); with "predictions" also its 0/1 predictions and labels in its own fixed
    order (McNemar pairs each image's prediction before and after an update).
    """

    n_hc: int
    n_pd: int
    fp: int
    fn: int
    hc_scores: np.ndarray | None = None
    pd_scores: np.ndarray | None = None
    pred: str = ""
    truth: str = ""


#: What a criterion needs from each share of the validation set (see `Tally`).
DETAILS = ("counts", "scores", "predictions")


def tally(y_true: np.ndarray, scores: np.ndarray, detail: str = "predictions",
          threshold: float = 0.5) -> Tally:
    """One share's `Tally` from its labels and scores (score >= threshold is PD)."""
    y = np.asarray(y_true).astype(int).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    pred = (s.astype(np.float64) >= threshold).astype(int)
    counts = dict(n_hc=int(np.sum(y == 0)), n_pd=int(np.sum(y == 1)),
                  fp=int(np.sum((pred == 1) & (y == 0))), fn=int(np.sum((pred == 0) & (y == 1))))
    if detail == "counts":
        return Tally(**counts)
    by_class = dict(hc_scores=np.sort(s[y == 0]), pd_scores=np.sort(s[y == 1]))
    if detail == "scores":
        return Tally(**counts, **by_class)
    return Tally(**counts, **by_class, pred=bits(pred), truth=bits(y))


def combine(tallies: Sequence[Tally], legacy_rates: bool = False) -> Evaluation:
    """The `Evaluation` of the union of the shares' images.

    FPR = FP / number of HC, FNR = FN / number of PD; with `legacy_rates` the authors'
    denominators (FP / number of PD, FN / number of HC). The cross-entropy and the AUROC
    come from the scores sorted within each class, so the result does not depend on how the
    images are split into shares or ordered: one machine and the centers get the same bits.
    """
    n_hc, n_pd = sum(t.n_hc for t in tallies), sum(t.n_pd for t in tallies)
    fp, fn = sum(t.fp for t in tallies), sum(t.fn for t in tallies)
    fp_den, fn_den = (n_pd, n_hc) if legacy_rates else (n_hc, n_pd)
    loss = auroc = math.nan
    if all(t.hc_scores is not None for t in tallies):
        hc = np.sort(np.concatenate([t.hc_scores for t in tallies]).astype(np.float64))
        pd = np.sort(np.concatenate([t.pd_scores for t in tallies]).astype(np.float64))
        y = np.concatenate([np.zeros(len(hc), int), np.ones(len(pd), int)])
        s = np.concatenate([hc, pd])
        loss, auroc = binary_cross_entropy(y, s), roc_auc(y, s)
    return Evaluation(acc=(n_hc + n_pd - fp - fn) / (n_hc + n_pd), fp=fp, fn=fn,
                      fpr=fp / fp_den, fnr=fn / fn_den, loss=loss, auroc=auroc,
                      pred="".join(t.pred for t in tallies),
                      truth="".join(t.truth for t in tallies))


def evaluate_predictions(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                         legacy_rates: bool = False) -> Evaluation:
    """Accuracy, false positives/negatives and their rates at `threshold` (score >= t is PD),
    the cross-entropy, the AUROC and the predictions, which the other criteria judge by:
    the whole validation set as one share (`combine`)."""
    return combine([tally(y_true, scores, "predictions", threshold)], legacy_rates)


def bits(values: np.ndarray) -> str:
    """0/1 values as a JSON-friendly string of '0' and '1'."""
    return "".join("01"[int(v)] for v in values)


def binary_cross_entropy(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean BCE in nats, probabilities clipped like Keras (so one sure miss stays finite)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), BCE_EPSILON, 1 - BCE_EPSILON)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse.reshape(-1)]


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half); NaN without both classes."""
    positive = np.asarray(y).reshape(-1) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan
    rank_sum = float(average_ranks(np.asarray(scores).reshape(-1))[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def is_harmful(new: Evaluation, reference: Evaluation, n_images: int, error: float) -> bool:
    """An update of n images is harmful when either rate rises by more than n * error."""
    return rates_verdict(new, reference, n_images, error).harmful


@dataclass
class ImageRecord:
    """What quality control did with one training image."""

    study: str
    times_flagged: int = 0
    first_flagged_cycle: int | None = None
    revisit_cycle: int | None = None
    eliminated_cycle: int | None = None
    flagged_limit: float | None = None  # the limit its last flag exceeded (`anchored`)


@dataclass
class QCState:
    """Everything the policy carries from cycle to cycle (saved with each checkpoint): with
    the windows of accepted statistics and what the calibration cost, a resumed run decides
    exactly as an uninterrupted one."""

    reference: Evaluation | None = None
    log: list[dict] = field(default_factory=list)
    schedule: dict[int, list[str]] = field(default_factory=dict)  # revisit cycle -> subjects
    images: dict[str, ImageRecord] = field(default_factory=dict)
    windows: dict[str, list[float]] = field(default_factory=dict)  # accepted statistics
    levels: dict[str, float] = field(default_factory=dict)  # center -> last accepted batch's
    calibration: dict = field(default_factory=dict)  # `QualityControl.calibrate`'s cost

    def to_json(self) -> dict:
        return {"reference": asdict(self.reference) if self.reference else None,
                "log": self.log,
                "schedule": {str(k): v for k, v in self.schedule.items()},
                "images": {k: asdict(v) for k, v in self.images.items()},
                "windows": self.windows, "levels": self.levels,
                "calibration": self.calibration}

    @classmethod
    def from_json(cls, data: dict) -> "QCState":
        windows = {k: list(v) for k, v in data.get("windows", {}).items()}
        if data.get("train_losses"):  # a checkpoint written before the windows
            windows.setdefault(PRETRAINING_WINDOW, list(data["train_losses"]))
        return cls(reference=Evaluation(**data["reference"]) if data["reference"] else None,
                   log=list(data["log"]),
                   schedule={int(k): list(v) for k, v in data["schedule"].items()},
                   images={k: ImageRecord(**v) for k, v in data["images"].items()},
                   windows=windows, levels=dict(data.get("levels", {})),
                   calibration=dict(data.get("calibration", {})))


def _draw(centers: dict[str, list[str]], n: int, rng: np.random.Generator
          ) -> tuple[str, list[str]]:
    """A calibration update: a random center's random n images (fewer where no center has
    n), as a batch of the regular pass is one center's."""
    names = [c for c, ids in centers.items() if len(ids) >= n] or list(centers)
    center = names[int(rng.integers(len(names)))]
    ids = centers[center]
    picked = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
    return center, [ids[i] for i in sorted(picked)]


def mixed_draw(pool: Sequence[str], take: int, labels: dict[str, int], batch: Sequence[str],
               rng: np.random.Generator) -> list[str]:
    """`take` images of `pool` (in pool order) that bring `batch` as near to as many of one
    label as of the other as the pool allows: each pick is of the label the batch holds fewer
    of (a tie: drawn), at random within the label; a label run out gives the other."""
    by_label = {k: [s for s in pool if labels[s] == k] for k in (0, 1)}
    for k, ids in by_label.items():
        by_label[k] = [ids[i] for i in rng.permutation(len(ids))]
    count = {k: sum(labels[s] == k for s in batch) for k in (0, 1)}
    picked = []
    for _ in range(take):
        k = 0 if count[0] < count[1] else 1 if count[1] < count[0] else int(rng.integers(2))
        if not by_label[k]:
            k = 1 - k
        picked.append(by_label[k].pop(0))
        count[k] += 1
    return sorted(picked, key=list(pool).index)


def one_label_centers(studies: dict[str, str], labels: dict[str, int]) -> list[str]:
    """The centers whose images (subject -> center in `studies`) are all of one label."""
    seen: dict[str, set[int]] = {}
    for subject, center in studies.items():
        seen.setdefault(center, set()).add(int(labels[subject]))
    return sorted(center for center, kinds in seen.items() if len(kinds) == 1)


def describe_calibration(calibration: dict) -> str:
    """The calibration's cost in one line (stderr and the run's summary say it); a run whose
    windows all came from the pre-training says that it needed none."""
    windows = "; ".join(f"{key}: {v['pre-training']} from the pre-training, "
                        f"{v['calibration']} calibration steps"
                        for key, v in calibration.get("windows", {}).items())
    if windows and not calibration.get("steps") and not calibration.get("evaluations"):
        return f"calibration: none needed ({windows})"
    return (f"calibration: {calibration.get('steps', 0)} steps (each undone), "
            f"{calibration.get('evaluations', 0)} evaluations, "
            f"{calibration.get('seconds', 0.0):.1f} s ({windows or 'no window'})")


Train = Callable[[str, list[str]], tuple[float, float]]
Evaluate = Callable[[Sequence[str]], Evaluation]
Event = Callable[[str], None]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Check:
    """One update made and judged (still in place): the state before it, its training loss
    and accuracy, its evaluation, the verdict, and the statistics that were not finite."""

    before: object
    loss: float
    acc: float
    ev: Evaluation
    verdict: Verdict
    nonfinite: tuple[str, ...] = ()


class QualityControl:
    """Verification of every update, revisit after R cycles, elimination on a second harm.

    train(center, ids) makes one update and returns its (training loss, accuracy);
    evaluate(ids) scores the model after an update of `ids` on the validation set;
    snapshot()/restore(s) undo an update exactly. `criterion` judges each update; `error`
    alone is the paper's rule, `Rates(error)`. `hold_out_momentum()` zeroes the
    optimizer's first moments; a criterion that checks with the momentum held out
    (`heldout`, `combined` for one image) calls it before its check step, so the check
    follows the candidate's own gradient rather than the momentum of earlier batches (Adam
    takes 90% of a step's direction from them); a harmless update is then undone and made
    again as the ordinary step, which is evaluated to become the next reference.
    An update that the criterion judges by its own training loss is not evaluated (its log
    row's figures are empty); the reference is then evaluated when a later check needs it,
    so decisions are those of evaluating every update, for fewer validation passes.
    A non-finite training or validation loss flags its update, always, with one warning
    line (`on_warning`, default stderr); it never becomes the reference nor enters a window.
    A criterion with a self-set threshold is calibrated before its first decision
    (`calibrate`). `labels` (each training image's 0/1 label) are needed only by a criterion
    that draws a revisit's witnesses by label (`balanced`; `separated` also judges a revisit
    batch of one label apart, `one_label_window`; `abstaining` leaves the centers of one label
    unjudged, `unjudged`).
    """

    def __init__(self, train: Train, evaluate: Evaluate, snapshot: Callable[[], object],
                 restore: Callable[[object], None], *, revisit: int, studies: dict[str, str],
                 error: float | None = None, criterion: Criterion | None = None,
                 state: QCState | None = None, on_event: Event | None = None,
                 hold_out_momentum: Callable[[], None] | None = None,
                 on_warning: Event | None = None, labels: dict[str, int] | None = None):
        self.train, self._evaluate = train, evaluate
        self.hold_out_momentum = hold_out_momentum
        self.snapshot, self.restore = snapshot, restore
        self.criterion = criterion or (Rates() if error is None else Rates(error))
        if self.criterion.mixes_witnesses() and labels is None:
            raise ValueError(f"criterion {self.criterion.name} needs the training labels")
        self.labels = labels
        # centers whose batches the criterion leaves unjudged (`abstaining`): all one label
        self.unjudged = [] if self.criterion.judges_one_label_centers() else \
            one_label_centers(studies, labels or {})
        self.revisit = revisit
        self.state = state or QCState(images={s: ImageRecord(c) for s, c in studies.items()})
        # this run's training images: a resumed federated run may have left a center out,
        # whose images stay in the state's records but are never drawn for calibration
        self.present = set(studies)
        self.on_event = on_event or (lambda message: None)
        self.on_warning = on_warning or _to_stderr
        if self.unjudged:
            self.on_event(f"centers of one label, trained unjudged ({self.criterion.name}): "
                          f"{', '.join(self.unjudged)}")
        self.cycle = 0
        self.evaluations = 0  # validation passes made by this object (not saved)

    def evaluate(self, ids: Sequence[str]) -> Evaluation:
        self.evaluations += 1
        return self._evaluate(ids)

    # --- bookkeeping -----------------------------------------------------------------------
    def _log(self, subject: str, study: str, ev: Evaluation, verdict: Verdict,
             train_loss: float | None = None, n_images: int = 0, adopted: bool = True) -> None:
        """One log row in the criterion's columns; an accepted update that stays made
        (`adopted`) becomes the reference and its statistic enters the window of its kind and
        scale (batches and single images apart: with BatchNorm over one image their
        statistics have another scale)."""
        row = {"Cycle": self.cycle, "Subject": subject, "Study": study, "ACC": ev.acc,
               "FP": ev.fp, "FN": ev.fn, "PFP": ev.fpr, "PFN": ev.fnr,
               "Ignored": int(verdict.harmful), "VAL_LOSS": ev.loss, "VAL_AUROC": ev.auroc,
               "TRAIN_LOSS": math.nan if train_loss is None else train_loss,
               "STATISTIC": verdict.statistic, "LIMIT": verdict.limit}
        self.state.log.append({k: row[k] for k in self.criterion.log_columns()})
        if verdict.harmful or not adopted:
            return
        self.state.reference = None if ev is NOT_EVALUATED else ev
        key = self.criterion.window_key(n_images) if n_images else None
        if key is not None:
            self.state.windows[key] = self.criterion.remember(self.state.windows.get(key, []),
                                                              verdict.statistic)
            if n_images > 1 and self.criterion.judges_against_center():
                self.state.levels[study] = verdict.statistic

    def baseline(self) -> Evaluation:
        """Evaluate the loaded model; logged as cycle 0, subject n/a, the first reference."""
        self.cycle = 0
        ev = self.evaluate([])
        if self.criterion.reads_validation_loss(1) and not math.isfinite(ev.loss):
            raise DQCError(f"the loaded model's validation loss is {ev.loss}: no update can "
                           "be judged against it")
        self._log("n/a", "n/a", ev, Verdict(harmful=False))
        return ev

    def calibrate(self, batch_size: int, seed: int,
                  pretraining: Sequence[float] = ()) -> dict:
        """Fill the window of the regular pass's updates (batches of `batch_size`) before the
        first decision (cold start).

        The window of batches' own training losses starts from the pre-training's last
        cycle (`pretraining`, whose updates were all kept) when it is given; any other
        window, or one left short, gets calibration steps: a random (seeded) center's batch,
        trained and judged as the run would, then undone exactly. The single-image window
        (batches of several images) is calibrated later, in each cycle that judges a single
        image (`image_window`). Returns (and keeps in the state) the cost: steps,
        evaluations, seconds."""
        self.state.calibration = {"steps": 0, "evaluations": 0, "seconds": 0.0,
                                  "windows": {}, "batch_size": max(batch_size, 1),
                                  "seed": seed}
        n = max(batch_size, 1)
        key = self.criterion.window_key(n)
        if key is not None:
            window: list[float] = []
            if key == PRETRAINING_WINDOW:
                for value in pretraining:
                    window = self.criterion.remember(window, float(value))
            rng = np.random.default_rng([seed, CALIBRATION_STREAM])
            centers = self._centers()
            self.state.windows[key] = self._fill(key, window, len(window),
                                                 lambda: _draw(centers, n, rng))
        return self.state.calibration

    def _centers(self, skip: Iterable[str] = ()) -> dict[str, list[str]]:
        """The images calibration may draw from, by center: this run's, not eliminated, not
        in `skip`."""
        skip = set(skip)
        centers: dict[str, list[str]] = {}
        for subject, record in self.state.images.items():
            if record.eliminated_cycle is None and subject in self.present \
                    and subject not in skip:
                centers.setdefault(record.study, []).append(subject)
        return centers

    def _fill(self, key: str, window: list[float], pretrained: int,
              draw: Callable[[], tuple[str, list[str]] | None],
              criterion: Criterion | None = None) -> list[float]:
        """Calibration steps until `window` holds MIN_WINDOW statistics (at most 3 x
        MIN_WINDOW tries): each `draw()` update (None: that try found none) trained, judged
        (by `criterion`, default the run's) and undone; its cost added to the state's
        calibration."""
        criterion = criterion or self.criterion
        start, evaluations = time.perf_counter(), self.evaluations
        cost = self.state.calibration
        source = cost["windows"].setdefault(key, {"pre-training": pretrained, "calibration": 0})
        tries = 0
        while len(window) < MIN_WINDOW and tries < 3 * MIN_WINDOW:
            tries += 1
            drawn = draw()
            if drawn is None:
                continue
            center, ids = drawn
            check = self._check(center, ids, window, criterion)
            self.restore(check.before)
            cost["steps"] += 1
            source["calibration"] += 1
            if check.nonfinite:
                self._warn_nonfinite(check, center, ids, "calibration step left out")
            window = criterion.remember(window, check.verdict.statistic)
        cost["evaluations"] += self.evaluations - evaluations
        cost["seconds"] = round(cost["seconds"] + time.perf_counter() - start, 3)
        return window

    def image_window(self) -> list[float]:
        """The window a single image is judged against.

        Where batches hold several images, a single image is only ever judged as a suspect
        (retried alone from a flagged batch, or revisited), so a suspect's statistic never
        enters a window (were it harmful and accepted, it would raise the bar for the next
        ones). The window is calibrated afresh in each cycle that judges a single image, at
        that cycle's learning rate and model: single-image steps on a random image of each
        calibration batch that the criterion accepts (each step undone; seeded by the run's
        seed and the cycle)."""
        key = self.criterion.window_key(1)
        cost = self.state.calibration
        if key is None or not self._suspects_apart():
            return self.state.windows.get(key, []) if key else []
        if cost.get("image_cycle") != self.cycle:
            n = cost["batch_size"]
            batch_key = self.criterion.window_key(n)
            rng = np.random.default_rng([cost["seed"], CALIBRATION_STREAM, self.cycle])
            centers = self._centers()

            def draw() -> tuple[str, list[str]] | None:
                center, ids = _draw(centers, n, rng)
                check = self._check(center, ids, self.state.windows.get(batch_key, []))
                self.restore(check.before)
                cost["steps"] += 1
                if check.verdict.harmful:
                    return None
                return center, [ids[int(rng.integers(len(ids)))]]
            self.state.windows[key] = self._fill(key, [], 0, draw)
            cost["image_cycle"] = self.cycle
        return self.state.windows[key]

    def confirmation_window(self, confirmation: Criterion, due: Iterable[str] = ()
                            ) -> list[float]:
        """The window a confirmation is judged against: the confirming criterion's statistic
        on random kept batches of the regular size (each step undone), calibrated afresh in
        each cycle that confirms, at that cycle's learning rate and model (seeded by the run's
        seed and the cycle). Only kept images are drawn (not waiting, not `due` for this
        cycle's revisit): a suspect's harm would raise the bar."""
        n = self.state.calibration.get("batch_size", 1)
        key = confirmation.window_key(n)
        cost = self.state.calibration
        if cost.get("confirm_cycle") != self.cycle:
            rng = np.random.default_rng([cost.get("seed", 0), CALIBRATION_STREAM, self.cycle,
                                         CONFIRM_STREAM])
            centers = self._centers(self.waiting() | set(due))
            # no kept image at all: the window stays short, and a short window confirms nothing
            self.state.windows[key] = self._fill(
                key, [], 0, lambda: _draw(centers, n, rng) if centers else None, confirmation)
            cost["confirm_cycle"] = self.cycle
        return self.state.windows[key]

    def one_label_window(self, due: Iterable[str] = ()) -> list[float]:
        """The window a revisit batch of one label is judged against (`separated`): check
        steps on random kept batches of one label (a random center and label with two kept
        images or more, up to the regular batch size; not waiting, not `due`; each step
        undone), calibrated afresh in each cycle that needs it, at that cycle's learning rate
        and model (seeded by the run's seed and the cycle)."""
        cost = self.state.calibration
        key = f"{self.criterion.window_key(cost['batch_size'])}:one label"
        if cost.get("one_label_cycle") != self.cycle:
            n = cost["batch_size"]
            rng = np.random.default_rng([cost["seed"], CALIBRATION_STREAM, self.cycle,
                                         ONE_LABEL_STREAM])
            groups = [(center, [s for s in ids if self.labels[s] == label])
                      for center, ids in sorted(self._centers(self.waiting() | set(due)).items())
                      for label in (0, 1)]
            groups = [(center, ids) for center, ids in groups if len(ids) >= 2]

            def draw() -> tuple[str, list[str]] | None:
                if not groups:
                    return None  # the window stays short, and a short window flags nothing
                center, ids = groups[int(rng.integers(len(groups)))]
                picked = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
                return center, [ids[i] for i in sorted(picked)]
            self.state.windows[key] = self._fill(key, [], 0, draw)
            cost["one_label_cycle"] = self.cycle
        return self.state.windows[key]

    def start_cycle(self, cycle: int) -> None:
        """A new cycle begins: its number goes into the log rows and the revisit schedule."""
        self.cycle = cycle

    def waiting(self) -> set[str]:
        return {s for subjects in self.state.schedule.values() for s in subjects}

    def eliminated(self) -> set[str]:
        return {s for s, r in self.state.images.items() if r.eliminated_cycle is not None}

    def batch_labels(self) -> dict[str, int] | None:
        """The labels the regular pass deals each center's batches by (`stratified`), or
        None: the paper's batches."""
        return self.labels if self.criterion.stratifies_batches() else None

    def select(self, center: str, ids: list[str]) -> list[str]:
        """A center's images for the regular pass: not eliminated, not waiting for a revisit."""
        skip = self.waiting() | self.eliminated()
        return [s for s in ids if s not in skip]

    # --- the policy ------------------------------------------------------------------------
    def _nonfinite(self, ev: Evaluation, loss: float, n_images: int,
                   criterion: Criterion | None = None) -> tuple[str, ...]:
        bad = () if math.isfinite(loss) else (f"training loss {loss}",)
        if (criterion or self.criterion).reads_validation_loss(n_images) \
                and not math.isfinite(ev.loss):
            bad += (f"validation loss {ev.loss}",)
        return bad

    def _warn_nonfinite(self, check: Check, center: str, ids: list[str], outcome: str) -> None:
        what = "batch of" if len(ids) > 1 else "image"
        self.on_warning(f"warning: cycle {self.cycle}, center {center}, {what} "
                        f"{', '.join(ids)}: {' and '.join(check.nonfinite)}; {outcome}")

    def _check(self, center: str, ids: list[str], window: Sequence[float],
               criterion: Criterion | None = None, floor: float | None = None) -> Check:
        """Snapshot, train (with the momentum held out where the criterion says), evaluate
        where it needs it, judge against `window` (by `criterion`, default the run's; with
        a `floor` under its limit, `at_least`). The update stays made."""
        criterion = criterion or self.criterion
        n = len(ids)
        evaluated = criterion.needs_evaluation(n)
        if evaluated and self.state.reference is None:  # stale after unevaluated updates
            self.state.reference = self.evaluate([])
        before = self.snapshot()
        if criterion.holds_out_momentum(n):
            if self.hold_out_momentum is None:
                raise ValueError(f"criterion {criterion.name} needs hold_out_momentum")
            self.hold_out_momentum()
        loss, acc = self.train(center, ids)
        ev = self.evaluate(ids) if evaluated else NOT_EVALUATED
        verdict = at_least(criterion.judge(ev, self.state.reference, n, loss, window), floor)
        bad = self._nonfinite(ev, loss, n, criterion)
        if bad:
            verdict = Verdict(True, verdict.statistic, verdict.limit)
        return Check(before, loss, acc, ev, verdict, bad)

    def _try(self, center: str, ids: list[str], subject: str, suspect: bool = False,
             keep: bool = True, floor: float | None = None,
             window: Sequence[float] | None = None) -> Check:
        """Check, log; undo if harmful (and, unless `keep`, if harmless too). Returns the
        check (its verdict, loss and accuracy). A `suspect` (one image retried from a flagged
        batch, or revisited) alone is judged against `image_window`, with its witnesses
        against the batches' window or the `window` given (and at least `floor`); its
        statistic enters no window."""
        n = len(ids)
        key = self.criterion.window_key(n)
        if window is None:
            window = self.image_window() if suspect and n == 1 else \
                (self.state.windows.get(key, []) if key else [])
        if n > 1 and self.criterion.judges_against_center():
            own = center_floor(self.state.levels.get(center), window, self.criterion.z)
            floor = max((f for f in (floor, own) if f is not None), default=None)
        check = self._check(center, ids, window, floor=floor)
        if self.criterion.holds_out_momentum(n) and not check.verdict.harmful:
            self.restore(check.before)  # keep the ordinary step, with its momentum
            loss, acc = self.train(center, ids)
            ev = self.evaluate(ids)
            bad = self._nonfinite(ev, loss, n)
            verdict = Verdict(True, check.verdict.statistic, check.verdict.limit) if bad \
                else check.verdict
            check = Check(check.before, loss, acc, ev, verdict, bad)
        if check.nonfinite:
            self._warn_nonfinite(check, center, ids, "flagged and undone")
        self._log(subject, center, check.ev, check.verdict, train_loss=check.loss,
                  n_images=0 if suspect and self._suspects_apart() else n, adopted=keep)
        if check.verdict.harmful or not keep:
            self.restore(check.before)
        return check

    def _suspects_apart(self) -> bool:
        """Suspects stay out of the windows where batches hold several images (with one
        image per batch every update is a single image: the regular pass's window)."""
        return self.state.calibration.get("batch_size", 1) > 1

    def _flag(self, subject: str) -> ImageRecord:
        record = self.state.images[subject]
        record.times_flagged += 1
        if record.first_flagged_cycle is None:
            record.first_flagged_cycle = self.cycle
        return record

    def _suspect(self, subject: str, verdict: Verdict) -> None:
        """Flag an image (remembering the limit its `verdict` exceeded) and schedule its
        revisit in R cycles (it leaves the regular pass)."""
        record = self._flag(subject)
        record.flagged_limit = verdict.limit if math.isfinite(verdict.limit) else None
        record.revisit_cycle = self.cycle + self.revisit
        self.state.schedule.setdefault(record.revisit_cycle, []).append(subject)

    def verify_batch(self, center: str, ids: list[str]) -> tuple[float, float]:
        """Regular pass: keep a harmless batch; else retry each image alone, flag the harmful
        (a criterion that confirms at the revisit instead flags them all). A center left
        unjudged (`unjudged`) trains its batch, logged with its loss and no limit."""
        if center in self.unjudged:
            loss, acc = self.train(center, ids)
            self._log("batch", center, NOT_EVALUATED, Verdict(False, loss), train_loss=loss)
            return loss, acc
        if len(ids) == 1 and not self.criterion.retries_alone() and self._suspects_apart():
            return self.verify_lone(center, ids[0])
        check = self._try(center, ids, "batch")
        loss, acc = check.loss, check.acc
        if not check.verdict.harmful:
            return loss, acc
        if not self.criterion.retries_alone():
            for subject in ids:
                self._suspect(subject, check.verdict)
            self.on_event(f"cycle {self.cycle}: batch of {len(ids)} at {center} flagged; its "
                          f"images wait for their revisit in cycle {self.cycle + self.revisit}")
            return loss, acc
        self.on_event(f"cycle {self.cycle}: batch of {len(ids)} at {center} flagged; "
                      "checking its images one by one")
        for subject in ids:
            alone = self._try(center, [subject], subject, suspect=True)
            if alone.verdict.harmful:
                self._suspect(subject, alone.verdict)
                self.on_event(f"cycle {self.cycle}: {subject} ({center}) harmful; "
                              f"revisit in cycle {self.cycle + self.revisit}")
        return loss, acc

    def verify_lone(self, center: str, subject: str) -> tuple[float, float]:
        """A batch of one image (its center's last) under a criterion that judges images
        with witnesses (`witnessed` and those built on it). One image alone is nearly blind
        (BatchNorm over one image), and such a run has no window of single images: it is
        judged as its revisit would be, with witnesses of its center against the batches'
        window, a check step undone whatever its verdict (seeded by the run's seed, the cycle
        and the center). Harmful, or no witness to judge it with (a step on it alone, undone,
        gives the loss its row shows): flagged, it waits for its revisit. Harmless: the
        paper's step on it alone is made."""
        seed = self.state.calibration.get("seed", 0)
        rng = np.random.default_rng([seed, LONE_STREAM, self.cycle, zlib.crc32(center.encode())])
        ids = [subject, *self.witnesses([subject], [subject], rng, co_suspects=False)]
        if len(ids) == 1:  # nothing to judge it with: a step alone, undone, for its loss
            check = self._check(center, ids, [])
            self.restore(check.before)
            if check.nonfinite:
                self._warn_nonfinite(check, center, ids, "flagged and undone")
            verdict = Verdict(True, check.loss)
            self._log("batch", center, check.ev, verdict, train_loss=check.loss)
        else:  # judged against the batches' window, its statistic entering none
            check = self._try(center, ids, "batch", suspect=True, keep=False)
            verdict = check.verdict
        loss, acc = check.loss, check.acc
        if verdict.harmful:
            self._suspect(subject, verdict)
            self.on_event(f"cycle {self.cycle}: {subject}, alone in its batch at {center}, "
                          f"flagged; revisit in cycle {self.cycle + self.revisit}")
            return loss, acc
        self.state.reference = None  # the model moves unevaluated
        return self.train(center, [subject])

    def witnesses(self, subjects: Sequence[str], due: Sequence[str], rng: np.random.Generator,
                  co_suspects: bool = True) -> list[str]:
        """The images suspects (of one center) are judged with: up to batch size - their
        number of kept images of their center (neither eliminated nor waiting for a
        revisit), drawn at random (to balance the batch's labels where the criterion says,
        `mixed_draw`); where the center has too few, the rest from the other suspects
        revisited at that center (`co_suspects`). Under `pooled`, a label that neither the
        suspects nor the kept images hold is drawn from the center's images waiting for a
        later revisit, with the kept ones."""
        study = self.state.images[subjects[0]].study
        n = self.state.calibration.get("batch_size", 1) - len(subjects)
        at_center = [s for s, r in self.state.images.items() if r.study == study]
        picked: list[str] = []
        others = [s for s in due if s not in subjects and self.state.images[s].study == study]
        kept = [s for s in self.select(study, at_center) if s not in due]
        if self.criterion.borrows_witnesses():  # a label the batch lacks, from later revisits
            have, later = {self.labels[s] for s in [*subjects, *kept]}, self.waiting()
            kept += [s for s in at_center if s in later and self.labels[s] not in have]
        for pool in (kept, others if co_suspects else []):
            take = min(n - len(picked), len(pool))
            if take > 0 and self.criterion.mixes_witnesses():
                picked += mixed_draw(pool, take, self.labels, [*subjects, *picked], rng)
            elif take > 0:
                picked += [pool[i] for i in sorted(rng.choice(len(pool), take, replace=False))]
        return picked

    def revisit_pass(self) -> None:
        """Images scheduled for this cycle train alone once more; harmful again: eliminated.
        A criterion that does not retry images alone judges each with its witnesses instead
        (`witnesses`; seeded by the run's seed and the cycle), a check step undone whatever
        its verdict: the image rejoins the regular pass or is eliminated."""
        due = self.state.schedule.pop(self.cycle, [])
        alone = self.criterion.retries_alone()
        rng = None if alone else np.random.default_rng(
            [self.state.calibration.get("seed", 0), WITNESS_STREAM, self.cycle])
        again: list[str] = []
        for subject in due:
            record = self.state.images[subject]
            ids = [subject] if alone else [subject, *self.witnesses([subject], due, rng)]
            floor = record.flagged_limit if self.criterion.anchors_revisit() else None
            one_label = self.criterion.separates_labels() and len(ids) > 1 \
                and len({self.labels[s] for s in ids}) == 1
            if self._try(record.study, ids, subject, suspect=True, keep=alone, floor=floor,
                         window=self.one_label_window(due) if one_label else None
                         ).verdict.harmful:
                again.append(subject)
            else:
                self._back(subject, "passed its revisit")
        confirmation = self.criterion.confirmation()
        if confirmation is None:
            for subject in again:
                self._eliminate(subject, "harmful again")
            return
        window = self.confirmation_window(confirmation, due) if again else []
        for center, ids in self._groups(again):
            batch = [*ids, *self.witnesses(ids, due, rng, co_suspects=False)]
            if self._confirm(center, batch, ids, confirmation, window):
                for subject in ids:
                    self._eliminate(subject, "harmful again, confirmed")
            else:
                for subject in ids:
                    self._back(subject, "harmful again, not confirmed")

    def _eliminate(self, subject: str, why: str) -> None:
        record = self._flag(subject)
        record.eliminated_cycle = self.cycle
        self.on_event(f"cycle {self.cycle}: {subject} ({record.study}) {why}; eliminated")

    def _back(self, subject: str, why: str) -> None:
        self.on_event(f"cycle {self.cycle}: {subject} ({self.state.images[subject].study}) "
                      f"{why}; back in training")

    def _groups(self, subjects: Sequence[str]) -> list[tuple[str, list[str]]]:
        """The images to confirm by center (in the order met), in chunks of the regular
        batch size."""
        n = max(self.state.calibration.get("batch_size", 1), 1)
        by_center: dict[str, list[str]] = {}
        for subject in subjects:
            by_center.setdefault(self.state.images[subject].study, []).append(subject)
        return [(center, ids[i:i + n]) for center, ids in by_center.items()
                for i in range(0, len(ids), n)]

    def _confirm(self, center: str, batch: list[str], ids: list[str], confirmation: Criterion,
                 window: Sequence[float]) -> bool:
        """One check step on `batch` (the suspects `ids` and kept images of their center
        where they are fewer than a regular batch) by the confirming criterion against
        `window` (`confirmation_window`), undone whatever the verdict; one log row per
        suspect. Returns whether it confirmed harm."""
        check = self._check(center, batch, window, confirmation)
        self.restore(check.before)
        if check.nonfinite:
            self._warn_nonfinite(check, center, batch, "confirmed harmful")
        for subject in ids:
            self._log(subject, center, check.ev, check.verdict, train_loss=check.loss,
                      adopted=False)
        return check.verdict.harmful

    # --- reporting -------------------------------------------------------------------------
    def status(self, subject: str) -> str:
        record = self.state.images[subject]
        if record.eliminated_cycle is not None:
            return "eliminated"
        return "pending" if subject in self.waiting() else "kept"
