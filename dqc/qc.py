"""Quality control: the harm criteria and the verification / revisit / elimination policy.

Pure Python and numpy, no deep-learning import: training, evaluation, snapshot and restore
come in as callables, so the policy is the same whether a step runs here or on a hospital's
machine, and it can be tested with a stand-in evaluator.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from dqc import defaults

#: Floating-point slack so that a rise exactly equal to the threshold is not harmful.
TOLERANCE = 1e-9
#: Keras clips predicted probabilities to [eps, 1 - eps] in binary cross-entropy.
BCE_EPSILON = 1e-7
#: The trainloss criterion flags nothing until this many accepted losses are known.
MIN_WINDOW = 10
#: MAD * this estimates the standard deviation of normally distributed values.
MAD_TO_SD = 1.4826

LOG_COLUMNS = ["Cycle", "Subject", "Study", "ACC", "FP", "FN", "PFP", "PFN", "Ignored"]
#: Appended to the paper's nine columns under any criterion but `rates`.
CRITERION_COLUMNS = ["VAL_LOSS", "VAL_AUROC", "TRAIN_LOSS", "STATISTIC", "LIMIT"]
#: Each criterion's parameters (the `Criterion` fields it reads).
CRITERIA = {"rates": ("error",), "loss": ("error",), "mcnemar": ("alpha",),
            "trainloss": ("z", "window"), "heldout": ("error",),
            "combined": ("z", "window", "error")}


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
    fpr: float
    fnr: float
    loss: float = math.nan
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


# --- criteria: each returns the decision with the statistic and limit it compared -----------

@dataclass(frozen=True)
class Verdict:
    """A criterion's decision and the numbers it compared, so that the log can show why."""

    harmful: bool
    statistic: float = math.nan
    limit: float = math.nan


def rates_verdict(new: Evaluation, reference: Evaluation, n_images: int,
                  error: float) -> Verdict:
    """The paper's rule; statistic: the larger rise of FPR and FNR, limit n * error."""
    limit = n_images * error
    rise = max(new.fpr - reference.fpr, new.fnr - reference.fnr)
    return Verdict(rise > limit + TOLERANCE, rise, limit)


def loss_verdict(new_loss: float, reference_loss: float, n_images: int,
                 tolerance: float) -> Verdict:
    """Harmful when the validation BCE rises by more than n * tolerance nats: unlike the
    rates it also sees scores that move towards the wrong side without crossing 0.5."""
    limit = n_images * tolerance
    rise = new_loss - reference_loss
    return Verdict(rise > limit + TOLERANCE, rise, limit)


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2 ** n


def mcnemar_verdict(new: Evaluation, reference: Evaluation, alpha: float) -> Verdict:
    """Exact one-sided McNemar test on the validation images whose prediction the update
    changed: b right before and wrong now, c the reverse. Harmful when b > c and
    P(X >= b) < alpha for X ~ Binomial(b + c, 1/2). Statistic: that p-value, limit: alpha.
    """
    if not (len(new.pred) == len(reference.pred) == len(new.truth)) or not new.pred:
        raise ValueError("McNemar needs the predictions of the same validation images")
    changed = [(old == y) for old, now, y in zip(reference.pred, new.pred, new.truth)
               if old != now]
    b = sum(changed)  # a changed prediction is right in exactly one of the two states
    c = len(changed) - b
    p = binomial_tail(b, b + c)
    return Verdict(b > c and p < alpha, p, alpha)


def robust_limit(window: Sequence[float], z: float) -> float:
    """median + z * 1.4826 * MAD: a high outlier bound that a few outliers cannot inflate."""
    median = statistics.median(window)
    mad = statistics.median(abs(x - median) for x in window)
    return median + z * MAD_TO_SD * mad


def trainloss_verdict(train_loss: float, window: Sequence[float], z: float) -> Verdict:
    """Harmful when the candidate's own training loss is an outlier among the recently
    accepted ones; needs no validation set. Flags nothing while the window is short."""
    if len(window) < MIN_WINDOW:
        return Verdict(False, train_loss)
    limit = robust_limit(window, z)
    return Verdict(train_loss > limit + TOLERANCE, train_loss, limit)


@dataclass(frozen=True)
class Criterion:
    """Which rule judges an update, and its parameters (`CRITERIA` says which it reads).

    error: per-image tolerance, of a rate (`rates`) or of the validation BCE in nats
    (`loss`), or the tolerated rise of the validation BCE of a check step taken with Adam's
    first moments held out (`heldout`, nats, whatever the number of images: Adam's step size
    does not grow with the batch); alpha: McNemar's significance level; z, window: the
    `trainloss` bound and how many accepted training losses it looks back on. `combined`
    judges batches as `trainloss` and one image alone as `heldout`: a batch's own loss sees
    harm, one image's does not (BatchNorm over one image), its validation check does.
    """

    name: str = defaults.CRITERION
    error: float = defaults.ERROR
    alpha: float = defaults.ALPHA
    z: float = defaults.Z
    window: int = defaults.WINDOW

    def params(self) -> dict:
        return {"name": self.name, **{k: getattr(self, k) for k in CRITERIA[self.name]}}

    def needs_evaluation(self, n_images: int) -> bool:
        """Whether judging an update of n images needs the validation set: not when its own
        training loss decides (`trainloss`, and `combined`'s batches)."""
        return not (self.name == "trainloss" or (self.name == "combined" and n_images > 1))

    def evaluation_detail(self) -> str:
        """What each share of the validation set must tell (`Tally`): the paper's rule needs
        the counts only; McNemar each image's prediction; the others log the cross-entropy
        and the AUROC, which need the scores."""
        return {"rates": "counts", "mcnemar": "predictions"}.get(self.name, "scores")

    def holds_out_momentum(self, n_images: int) -> bool:
        """Whether the check step is taken without the optimizer's momentum: always under
        `heldout`, for one image alone under `combined`."""
        return self.name == "heldout" or (self.name == "combined" and n_images == 1)

    def judge(self, new: Evaluation, reference: Evaluation, n_images: int,
              train_loss: float, accepted_losses: Sequence[float]) -> Verdict:
        if self.name == "rates":
            return rates_verdict(new, reference, n_images, self.error)
        if self.name == "loss":
            return loss_verdict(new.loss, reference.loss, n_images, self.error)
        if self.name == "mcnemar":
            return mcnemar_verdict(new, reference, self.alpha)
        if self.name == "trainloss":
            return trainloss_verdict(train_loss, accepted_losses, self.z)
        if self.holds_out_momentum(n_images):  # heldout, or combined for one image
            return loss_verdict(new.loss, reference.loss, 1, self.error)
        if self.name == "combined":
            return trainloss_verdict(train_loss, accepted_losses, self.z)
        raise ValueError(f"unknown criterion {self.name!r}")

    def log_columns(self) -> list[str]:
        """The paper's nine columns; under another criterion, what it decided on as well."""
        return LOG_COLUMNS if self.name == "rates" else LOG_COLUMNS + CRITERION_COLUMNS


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
    train_losses: list[float] = field(default_factory=list)  # of the last accepted updates

    def to_json(self) -> dict:
        return {"reference": asdict(self.reference) if self.reference else None,
                "log": self.log,
                "schedule": {str(k): v for k, v in self.schedule.items()},
                "images": {k: asdict(v) for k, v in self.images.items()},
                "train_losses": self.train_losses}

    @classmethod
    def from_json(cls, data: dict) -> "QCState":
        return cls(reference=Evaluation(**data["reference"]) if data["reference"] else None,
                   log=list(data["log"]),
                   schedule={int(k): list(v) for k, v in data["schedule"].items()},
                   images={k: ImageRecord(**v) for k, v in data["images"].items()},
                   train_losses=list(data.get("train_losses", [])))


Train = Callable[[str, list[str]], tuple[float, float]]
Evaluate = Callable[[Sequence[str]], Evaluation]
Event = Callable[[str], None]


class QualityControl:
    """Verification of every update, revisit after R cycles, elimination on a second harm.

    train(center, ids) makes one update and returns its (training loss, accuracy);
    evaluate(ids) scores the model after an update of `ids` on the validation set;
    snapshot()/restore(s) undo an update exactly. `criterion` judges each update; `error`
    alone is the paper's rule, `Criterion("rates", error)`. `hold_out_momentum()` zeroes the
    optimizer's first moments; criterion `heldout` calls it before its check step, so the
    check follows the candidate's own gradient rather than the momentum of earlier batches
    (Adam takes 90% of a step's direction from them); a harmless update is then undone and
    made again as the ordinary step, which is evaluated to become the next reference.
    An update that the criterion judges by its own training loss is not evaluated (its log
    row's figures are empty); the reference is then evaluated when a later check needs it,
    so decisions are those of evaluating every update, for fewer validation passes.
    `train_losses` starts a new run's window of accepted batch losses (`trainloss`): the
    pre-training's last cycle, whose updates were all kept, so that a harmful center met
    before ten batches were accepted is judged too.
    """

    def __init__(self, train: Train, evaluate: Evaluate, snapshot: Callable[[], object],
                 restore: Callable[[object], None], *, revisit: int, studies: dict[str, str],
                 error: float = defaults.ERROR, criterion: Criterion | None = None,
                 state: QCState | None = None, on_event: Event | None = None,
                 hold_out_momentum: Callable[[], None] | None = None,
                 train_losses: Sequence[float] = ()):
        self.train, self.evaluate = train, evaluate
        self.hold_out_momentum = hold_out_momentum
        self.snapshot, self.restore = snapshot, restore
        self.criterion = criterion or Criterion("rates", error=error)
        self.revisit = revisit
        self.state = state or QCState(
            images={s: ImageRecord(c) for s, c in studies.items()},
            train_losses=list(train_losses)[-self.criterion.window:])
        self.on_event = on_event or (lambda message: None)
        self.cycle = 0

    # --- bookkeeping -----------------------------------------------------------------------
    def _log(self, subject: str, study: str, ev: Evaluation, verdict: Verdict,
             train_loss: float | None = None) -> None:
        """One log row; an accepted update becomes the reference, and an accepted batch of the
        regular pass enters the loss window.

        Single-image updates stay out of the window: with BatchNorm over one image their own
        training loss is near ln 2 whatever the image (measured: good single images 0.67-0.75
        against 0.15-0.18 for good batches of 5), so they would only inflate the limit."""
        row = {"Cycle": self.cycle, "Subject": subject, "Study": study, "ACC": ev.acc,
               "FP": ev.fp, "FN": ev.fn, "PFP": ev.fpr, "PFN": ev.fnr,
               "Ignored": int(verdict.harmful)}
        if self.criterion.name != "rates":  # the paper's rule keeps the paper's log
            row.update({"VAL_LOSS": ev.loss, "VAL_AUROC": ev.auroc,
                        "TRAIN_LOSS": math.nan if train_loss is None else train_loss,
                        "STATISTIC": verdict.statistic, "LIMIT": verdict.limit})
        self.state.log.append(row)
        if verdict.harmful:
            return
        self.state.reference = None if ev is NOT_EVALUATED else ev
        if train_loss is not None and subject == "batch":
            recent = self.state.train_losses + [train_loss]
            self.state.train_losses = recent[-self.criterion.window:]

    def baseline(self) -> Evaluation:
        """Evaluate the loaded model; logged as cycle 0, subject n/a, the first reference."""
        self.cycle = 0
        ev = self.evaluate([])
        self._log("n/a", "n/a", ev, Verdict(harmful=False))
        return ev

    def start_cycle(self, cycle: int) -> None:
        """A new cycle begins: its number goes into the log rows and the revisit schedule."""
        self.cycle = cycle

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
        evaluated = self.criterion.needs_evaluation(len(ids))
        if evaluated and self.state.reference is None:  # stale after unevaluated updates
            self.state.reference = self.evaluate([])
        snap = self.snapshot()
        held_out = self.criterion.holds_out_momentum(len(ids))
        if held_out:
            if self.hold_out_momentum is None:
                raise ValueError("criterion heldout needs hold_out_momentum")
            self.hold_out_momentum()
        loss, acc = self.train(center, ids)
        ev = self.evaluate(ids) if evaluated else NOT_EVALUATED
        verdict = self.criterion.judge(ev, self.state.reference, len(ids), loss,
                                       self.state.train_losses)
        if held_out and not verdict.harmful:  # keep the ordinary step, with its momentum
            self.restore(snap)
            loss, acc = self.train(center, ids)
            ev = self.evaluate(ids)
        self._log(subject, center, ev, verdict, train_loss=loss)
        if verdict.harmful:
            self.restore(snap)
        return verdict.harmful, loss, acc

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
