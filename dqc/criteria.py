"""The harm criteria: one class per criterion, one shape (`Criterion`), a registry by name.

A criterion knows its parameters and checks them itself, says what judging an update needs
(a validation pass or not, which detail of it, a check step with Adam's momentum held out),
which log columns it adds, and judges. Every criterion but the paper's `rates` (and the exact
test `mcnemar`) sets its own threshold: its statistic is compared with the run's own accepted
statistics of the same kind and scale (a window), limit median + z * 1.4826 * MAD, so its one
knob z is a robust z-score whose nominal one-sided false-flag rate under normality is
1 - Phi(z) (z = 3, the default: 0.13%). Pure Python: no deep-learning import.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, ClassVar, Sequence

from dqc import defaults
from dqc.errors import DQCError

if TYPE_CHECKING:
    from dqc.qc import Evaluation

#: Floating-point slack so that a rise exactly equal to the threshold is not harmful.
TOLERANCE = 1e-9
#: A self-set threshold decides nothing until this many accepted statistics are known; the
#: cold-start calibration takes this many steps per window.
MIN_WINDOW = 10
#: MAD * this estimates the standard deviation of normally distributed values.
MAD_TO_SD = 1.4826

LOG_COLUMNS = ["Cycle", "Subject", "Study", "ACC", "FP", "FN", "PFP", "PFN", "Ignored"]
#: Appended to the paper's nine columns under any criterion but `rates`.
CRITERION_COLUMNS = ["VAL_LOSS", "VAL_AUROC", "TRAIN_LOSS", "STATISTIC", "LIMIT"]
#: The window that a pre-training's saved batch losses seed (its updates were all kept).
PRETRAINING_WINDOW = "train_loss:batch"
#: The command-line flag of each parameter (for messages).
FLAGS = {"error": "-error", "alpha": "--alpha", "z": "--z", "window": "--window"}


@dataclass(frozen=True)
class Verdict:
    """A criterion's decision and the numbers it compared, so that the log can show why."""

    harmful: bool
    statistic: float = math.nan
    limit: float = math.nan


# --- the decision rules, as functions of numbers ---------------------------------------------

def rates_verdict(new: Evaluation, reference: Evaluation, n_images: int,
                  error: float) -> Verdict:
    """The paper's rule; statistic: the larger rise of FPR and FNR, limit n * error."""
    limit = n_images * error
    rise = max(new.fpr - reference.fpr, new.fnr - reference.fnr)
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


def at_least(verdict: Verdict, floor: float | None) -> Verdict:
    """`verdict` against the larger of its limit and `floor` (None: no floor). A revisit
    judged under `anchored` gets the limit its image's flag exceeded as the floor, so that a
    window that fell while the image waited does not by itself make it harmful again. A
    non-finite statistic stays harmful; a verdict with no limit (a short window) stays as it
    is."""
    if floor is None or not math.isfinite(verdict.statistic) or not math.isfinite(verdict.limit) \
            or floor <= verdict.limit:
        return verdict
    return Verdict(verdict.statistic > floor + TOLERANCE, verdict.statistic, floor)


def center_floor(level: float | None, window: Sequence[float], z: float) -> float | None:
    """The least limit a batch of a center is judged against under `centered`: its center's
    last accepted batch statistic (`level`) plus the run's spread above the median of the
    window (limit - median). None (no floor) where the center has no accepted batch yet or
    the window is too short to decide."""
    if level is None or not math.isfinite(level) or len(window) < MIN_WINDOW:
        return None
    return level + robust_limit(window, z) - statistics.median(window)


def self_set_verdict(statistic: float, window: Sequence[float], z: float) -> Verdict:
    """Harmful when the statistic is a high outlier among the run's accepted ones (`window`).

    A non-finite statistic is harmful, always. Below `MIN_WINDOW` known values nothing is
    decided (a run calibrates its windows before its first decision, `QualityControl`)."""
    if not math.isfinite(statistic):
        return Verdict(True, statistic)
    if len(window) < MIN_WINDOW:
        return Verdict(False, statistic)
    limit = robust_limit(window, z)
    return Verdict(statistic > limit + TOLERANCE, statistic, limit)


# --- the criteria ------------------------------------------------------------------------------

def _finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DQCError(f"{FLAGS[name]} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Criterion:
    """What makes an update harmful. Subclasses set `name` and `summary` and declare their
    parameters as fields (with their defaults); each field is a flag (`FLAGS`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def parameters(self) -> dict:
        """Name and parameters, as the run's summary reports them."""
        return {"name": self.name, **asdict(self)}

    def validate(self) -> None:
        """Raise `DQCError` (one line naming the flag) for an impossible setting."""

    def needs_evaluation(self, n_images: int) -> bool:
        """Whether judging an update of n images needs a validation pass."""
        return True

    def evaluation_detail(self) -> str:
        """What each share of the validation set must tell (`dqc.qc.Tally`): the scores, for
        the cross-entropy and the AUROC that the log shows."""
        return "scores"

    def holds_out_momentum(self, n_images: int) -> bool:
        """Whether the update is checked by a step with Adam's first moments zeroed."""
        return False

    def retries_alone(self) -> bool:
        """Whether a flagged batch's images are each retried alone at once (the paper's
        policy), rather than all flagged and confirmed at their revisit, each in a batch
        with kept images of its center (`witnessed`)."""
        return True

    def anchors_revisit(self) -> bool:
        """Whether a revisit is judged against at least the limit its image's flag exceeded
        (`at_least`)."""
        return False

    def mixes_witnesses(self) -> bool:
        """Whether a revisit's witnesses are drawn to balance its batch's labels
        (`dqc.qc.mixed_draw`): then the run needs each training image's label."""
        return False

    def confirmation(self) -> "Criterion | None":
        """The criterion that must confirm an image its revisit found harmful before it is
        eliminated (`confirmed`); None: the revisit's verdict eliminates."""
        return None

    def log_columns(self) -> list[str]:
        """The paper's nine columns and what this criterion decided on."""
        return LOG_COLUMNS + CRITERION_COLUMNS

    def window_key(self, n_images: int) -> str | None:
        """The window of accepted statistics an update of n images is judged against (and
        enters when accepted); None: no window."""
        return None

    def separates_labels(self) -> bool:
        """Whether a revisit batch of one label is judged against batches of one label
        (`separated`)."""
        return False

    def judges_one_label_centers(self) -> bool:
        """Whether the batches of a center whose training images are all of one label are
        judged (`abstaining` trains them unjudged)."""
        return True

    def stratifies_batches(self) -> bool:
        """Whether the regular pass deals each center's batches label by label, so that each
        holds both labels as evenly as the center's images allow (`stratified`,
        `dqc.travel.split_batches`)."""
        return False

    def borrows_witnesses(self) -> bool:
        """Whether a revisit may draw witnesses of a label its batch would lack (neither the
        suspects nor the center's kept images hold it) from the center's images waiting for a
        later revisit (`pooled`)."""
        return False

    def judges_against_center(self) -> bool:
        """Whether a batch of a center is judged against at least its center's own last
        accepted batch statistic plus the run's spread (`centered`, `center_floor`)."""
        return False

    def reads_validation_loss(self, n_images: int) -> bool:
        """Whether a validation loss is known for an update of n images (then a non-finite
        one flags it)."""
        return self.needs_evaluation(n_images) and self.evaluation_detail() != "counts"

    def problems(self, n_hc: int, n_pd: int, legacy_rates: bool) -> list[str]:
        """Warnings about this setting on a validation set of this size."""
        return []

    def remember(self, window: Sequence[float], statistic: float) -> list[float]:
        """The window after an accepted update with this statistic (none kept here)."""
        return list(window)

    def judge(self, new: Evaluation, reference: Evaluation, n_images: int, train_loss: float,
              window: Sequence[float]) -> Verdict:
        raise NotImplementedError


@dataclass(frozen=True)
class Rates(Criterion):
    """The paper's rule: FPR or FNR rises by more than k * e for an update of k images."""

    name: ClassVar[str] = "rates"
    summary: ClassVar[str] = ("the paper's rule: FPR or FNR rises by more than k * e for k "
                              "images (-error e)")
    error: float = defaults.ERROR

    def validate(self) -> None:
        _finite("error", self.error)
        if self.error < 0:
            raise DQCError(f"-error must be 0 or more, got {self.error}")

    def evaluation_detail(self) -> str:
        return "counts"

    def log_columns(self) -> list[str]:
        return LOG_COLUMNS  # the paper's rule keeps the paper's log

    def problems(self, n_hc: int, n_pd: int, legacy_rates: bool) -> list[str]:
        return [f"validation set too small for -error {self.error}: {problem}; every "
                "single-image check is then zero-tolerance and good images get eliminated "
                "for one flipped prediction"
                for problem in per_image_tolerance_problems(n_hc, n_pd, self.error,
                                                            legacy_rates)]

    def judge(self, new, reference, n_images, train_loss, window) -> Verdict:
        return rates_verdict(new, reference, n_images, self.error)


@dataclass(frozen=True)
class McNemar(Criterion):
    """Exact one-sided McNemar test on the validation predictions the update changed."""

    name: ClassVar[str] = "mcnemar"
    summary: ClassVar[str] = ("exact one-sided McNemar test on the validation predictions "
                              "the update changed, p < --alpha (its false-flag rate when an "
                              "update changes predictions at random)")
    alpha: float = defaults.ALPHA

    def validate(self) -> None:
        _finite("alpha", self.alpha)
        if not 0 < self.alpha < 1:
            raise DQCError(f"--alpha must be between 0 and 1, got {self.alpha}")

    def evaluation_detail(self) -> str:
        return "predictions"

    def judge(self, new, reference, n_images, train_loss, window) -> Verdict:
        return mcnemar_verdict(new, reference, self.alpha)


@dataclass(frozen=True)
class SelfSet(Criterion):
    """A statistic against the run's own accepted ones of the same kind and scale: harmful
    above median + z * 1.4826 * MAD of the last `window` of them (`self_set_verdict`)."""

    z: float = defaults.Z
    window: int = defaults.WINDOW

    def validate(self) -> None:
        _finite("z", self.z)
        if not self.z > 0:
            raise DQCError(f"--z must be greater than 0, got {self.z}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) \
                or self.window < MIN_WINDOW:
            raise DQCError(f"--window must be a whole number of at least {MIN_WINDOW}, got "
                           f"{self.window!r}")

    def remember(self, window: Sequence[float], statistic: float) -> list[float]:
        """The last `window` finite statistics: a non-finite one never enters."""
        kept = list(window) + ([statistic] if math.isfinite(statistic) else [])
        return kept[-self.window:]

    def kind(self, n_images: int) -> str:
        """What the statistic of an update of n images is (the window's name, with its scale)."""
        raise NotImplementedError

    def statistic(self, new: Evaluation, reference: Evaluation, n_images: int,
                  train_loss: float) -> float:
        raise NotImplementedError

    def window_key(self, n_images: int) -> str:
        """Batches and single images apart: with BatchNorm over one image a step's statistics
        have another scale (a good image's own loss is near ln 2, a good batch's ~0.15)."""
        return f"{self.kind(n_images)}:{'image' if n_images == 1 else 'batch'}"

    def judge(self, new, reference, n_images, train_loss, window) -> Verdict:
        return self_set_verdict(self.statistic(new, reference, n_images, train_loss),
                                window, self.z)


@dataclass(frozen=True)
class Loss(SelfSet):
    """The rise of the validation cross-entropy per image of the update."""

    name: ClassVar[str] = "loss"
    summary: ClassVar[str] = "the rise of the validation cross-entropy per image of the update"

    def kind(self, n_images: int) -> str:
        return "val_rise"

    def statistic(self, new, reference, n_images, train_loss) -> float:
        return (new.loss - reference.loss) / n_images


@dataclass(frozen=True)
class TrainLoss(SelfSet):
    """The update's own training loss: no validation pass at all."""

    name: ClassVar[str] = "trainloss"
    summary: ClassVar[str] = "the update's own training loss (no validation set needed)"

    def needs_evaluation(self, n_images: int) -> bool:
        return False

    def kind(self, n_images: int) -> str:
        return "train_loss"

    def statistic(self, new, reference, n_images, train_loss) -> float:
        return train_loss


@dataclass(frozen=True)
class HeldOut(SelfSet):
    """The validation cross-entropy's rise after a check step taken with Adam's first
    moments zeroed (the candidate's own gradient, not 90% the earlier batches'); a harmless
    update is then undone and made again as the ordinary step."""

    name: ClassVar[str] = "heldout"
    summary: ClassVar[str] = ("the validation cross-entropy's rise after a check step with "
                              "Adam's momentum held out; a harmless update is then made as "
                              "the ordinary step")

    def holds_out_momentum(self, n_images: int) -> bool:
        return True

    def kind(self, n_images: int) -> str:
        return "check_rise"

    def statistic(self, new, reference, n_images, train_loss) -> float:
        return new.loss - reference.loss


@dataclass(frozen=True)
class Combined(SelfSet):
    """Batches as `trainloss` (a batch's own loss sees harm, and costs no validation pass),
    one image alone as `heldout` (one image's own loss does not: BatchNorm over one image)."""

    name: ClassVar[str] = "combined"
    summary: ClassVar[str] = "batches as trainloss, one image alone as heldout"

    def _part(self, n_images: int) -> SelfSet:
        return HeldOut(self.z, self.window) if n_images == 1 else TrainLoss(self.z, self.window)

    def needs_evaluation(self, n_images: int) -> bool:
        return self._part(n_images).needs_evaluation(n_images)

    def holds_out_momentum(self, n_images: int) -> bool:
        return self._part(n_images).holds_out_momentum(n_images)

    def kind(self, n_images: int) -> str:
        return self._part(n_images).kind(n_images)

    def statistic(self, new, reference, n_images, train_loss) -> float:
        return self._part(n_images).statistic(new, reference, n_images, train_loss)


@dataclass(frozen=True)
class Witnessed(TrainLoss):
    """Batches as `trainloss`; a flagged batch's images are not retried alone (one image's
    own loss and its validation check are nearly blind with BatchNorm over one image): each
    waits for its revisit, where it is judged in a batch of the regular pass's size with
    kept images of its center (its witnesses), against the batches' window. No validation
    pass and no one-image step at all."""

    name: ClassVar[str] = "witnessed"
    summary: ClassVar[str] = ("batches as trainloss; a flagged batch's images are confirmed "
                              "at their revisit, each in a batch with kept images of its "
                              "center (no validation pass)")

    def retries_alone(self) -> bool:
        return False


@dataclass(frozen=True)
class Confirmed(Witnessed):
    """`witnessed`, but an image its revisit finds harmful again is eliminated only when the
    validation set confirms it. A batch's own loss cannot tell a harmful center from a small
    good one that the model has seen little (both are high); whether a step on its images
    raises the validation loss can (`heldout`: Adam's first moments held out, so that the step
    follows these images' gradient). The images found harmful again at one center are
    confirmed together, in batches of the regular size, each check step undone, against a
    window of the same check on random kept batches, calibrated in each cycle that confirms.
    Validation passes are spent only there."""

    name: ClassVar[str] = "confirmed"
    summary: ClassVar[str] = ("witnessed, and an image found harmful again at its revisit is "
                              "eliminated only if a check step on it (with its center's "
                              "other such images) raises the validation loss (heldout)")

    def confirmation(self) -> Criterion:
        return HeldOut(self.z, self.window)


@dataclass(frozen=True)
class Anchored(Witnessed):
    """`witnessed`, but a revisit is judged against the larger of the batches' limit now and
    the limit its image's flag exceeded. The window follows the training loss down while an
    image waits R cycles unseen; judged against that lower limit, a good image the model has
    not trained on since is harmful again for having waited (`at_least`)."""

    name: ClassVar[str] = "anchored"
    summary: ClassVar[str] = ("witnessed, and a revisit is judged against at least the limit "
                              "its image's flag exceeded (the window falls while it waits)")

    def anchors_revisit(self) -> bool:
        return True


@dataclass(frozen=True)
class Balanced(Anchored):
    """`anchored`, but a revisit's witnesses are drawn so that its batch holds both labels as
    evenly as its center's kept images allow (`dqc.qc.mixed_draw`). In training mode
    BatchNorm takes the batch's mean out, so a batch of one label has a loss as high as a
    harmful center's: a good image of its center's majority label, revisited with witnesses
    of that label, is found harmful again. The draw needs each training image's label where
    the policy runs."""

    name: ClassVar[str] = "balanced"
    summary: ClassVar[str] = ("anchored, and a revisit's witnesses are drawn to balance its "
                              "batch's labels (a batch of one label has a high loss)")

    def mixes_witnesses(self) -> bool:
        return True


@dataclass(frozen=True)
class Separated(Balanced):
    """`balanced`, but a revisit batch that is still of one label (its center has no kept
    image of the other) is judged against batches of one label: check steps on random kept
    ones, calibrated in each cycle that needs them. A center of one label has only such
    batches, whose loss is as high as a harmful center's against the batches' window
    (BatchNorm takes the batch's mean out): under `balanced` it is eliminated whole. The
    regular pass is `balanced`'s: a batch of one label there still meets the batches' window,
    so that an inverted batch of one label is flagged and met again, mixed, at its revisit."""

    name: ClassVar[str] = "separated"
    summary: ClassVar[str] = ("balanced, and a revisit batch of one label is judged against "
                              "batches of one label")

    def separates_labels(self) -> bool:
        return True


@dataclass(frozen=True)
class Abstaining(Balanced):
    """`balanced`, but the batches of a center whose training images are all of one label
    are trained unjudged. Every batch of such a center is of one label, in the regular pass
    and at any revisit, and in training mode BatchNorm takes the batch's mean out: its loss
    is as high as a harmful center's, and among batches of one label an inverted one looks
    like a good one (`separated`). The batch loss cannot judge such a center, so this
    criterion does not: the run names those centers, and their images are never flagged.
    An inverted center of one label goes through; the centers of both labels are judged as
    under `balanced`."""

    name: ClassVar[str] = "abstaining"
    summary: ClassVar[str] = ("balanced, and a center whose images are all of one label is "
                              "trained unjudged (its batch loss cannot tell)")

    def judges_one_label_centers(self) -> bool:
        return False


@dataclass(frozen=True)
class Stratified(Abstaining):
    """`abstaining`, but the regular pass deals each center's batches label by label: the
    same images in each cycle, in batches of the same size, each holding both labels as
    evenly as its center's images allow. In training mode BatchNorm takes the batch's mean
    out, so a good batch of one label has a loss nearly as high as an inverted one's
    (`bench/batch_composition.py`; docs/method.md, "Batches dealt by label"): under
    `abstaining` such batches at centers of both labels are flagged and wait for their
    revisit, out of training. A departure from the paper's loop, which shuffles a center's
    images and cuts them in order. Measured and not recommended."""

    name: ClassVar[str] = "stratified"
    summary: ClassVar[str] = ("abstaining, and each center's batches are dealt label by label "
                              "so that each holds both labels")

    def stratifies_batches(self) -> bool:
        return True


@dataclass(frozen=True)
class Pooled(Abstaining):
    """`abstaining`, but a revisit whose batch would lack a label (neither the suspect nor
    its center's kept images hold it) draws witnesses of that label from the center's images
    waiting for a later revisit. Under `abstaining` a center's images of one label can all
    be waiting when the other label's are revisited (flagged a cycle apart: a batch of one
    label is flagged, and so is the next): the revisit batch is then of one label, its loss
    as high as a harmful center's, and good images are eliminated (a whole center of seed 16
    in one order of training). The step is undone whatever its verdict, so a borrowed image
    is not trained; it is judged at its own revisit. A label the batch already holds is not
    borrowed: it would displace a co-suspect of the other label (seed 20, docs/method.md)."""

    name: ClassVar[str] = "pooled"
    summary: ClassVar[str] = ("abstaining, and a revisit's witnesses of a label its batch "
                              "would lack are drawn from the center's waiting images")

    def borrows_witnesses(self) -> bool:
        return True


@dataclass(frozen=True)
class Centered(Pooled):
    """`pooled`, but a batch of a center that has had a batch accepted in this run is judged
    against at least that center's last accepted batch loss plus the run's spread (the
    window's limit minus its median; `center_floor`). A small center whose images are harder
    than the rest (a scanner, a population) has a batch loss above the pool's; the window
    falls as the model learns, and such a center, accepted in one cycle, is flagged in the
    next at the same loss and eliminated whole at its revisit (seed 22's C15, seed 23's C14).
    A center none of whose batches was accepted is judged by the pool alone, as under
    `pooled`: no batch of a wholly harmful center was accepted on seeds 16-24. Withdrawn on
    its first untuned seed (25): an inverted center whose first batch passed the pool set its
    own floor, and each batch it let through raised it (docs/method.md)."""

    name: ClassVar[str] = "centered"
    summary: ClassVar[str] = ("pooled, and a center's batch is judged against at least its "
                              "own last accepted batch loss plus the run's spread (withdrawn: "
                              "a harmful center accepted once goes through)")

    def judges_against_center(self) -> bool:
        return True


#: The criteria by their command-line name.
CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (Rates, Loss, McNemar, TrainLoss,
                                                            HeldOut, Combined, Witnessed,
                                                            Confirmed, Anchored, Balanced,
                                                            Separated, Abstaining, Stratified,
                                                            Pooled, Centered)}


def own_word_criteria() -> list[str]:
    """The criteria that accept a batch on the training loss its center reports (no
    validation pass for it): what a federation with --no-own-word refuses."""
    return [name for name, kind in CRITERIA.items()
            if not kind().needs_evaluation(defaults.BATCH_SIZE)]


def make_criterion(name: str, **given) -> Criterion:
    """The criterion `name` with the parameters given (the others at their defaults).

    A parameter the criterion does not take is refused (one line naming the flag), so that a
    tolerance meant for another criterion is never silently ignored."""
    if name not in CRITERIA:
        raise DQCError(f"--criterion must be one of {', '.join(CRITERIA)}, got {name!r}")
    kind = CRITERIA[name]
    for key in given:
        if key not in kind.parameter_names():
            own = ", ".join(FLAGS[k] for k in kind.parameter_names()) or "none"
            raise DQCError(f"{FLAGS.get(key, key)} means nothing for --criterion {name} "
                           f"(its flags: {own})")
    return kind(**given)


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
