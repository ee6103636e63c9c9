r"""Detectability: how far one candidate update moves the server's validation figures.

    python -m dqc.detectability -en ENCODER -pd CLASSIFIER -fn_train train.csv \
        -fn_test val.csv --types inverted,noise -n 20 -error 0.02 --cycle 10 --out det

From ONE model state, every candidate (a batch of one center's images, or one image) gets one
training step at the learning rate of `--cycle`; the validation set is predicted and the
changes against the unchanged model are recorded; then the state is put back exactly, so every
candidate starts from the same weights, BatchNorm statistics, optimizer and dropout state.
Harmful candidates are either made on the fly from the good candidates' own images (`--types`,
a paired design: same images, corrupted in memory) or drawn from the training CSV's
`Harmful` rows by `HarmfulType`. The output says whether the QC rule (a rise of either error
rate by more than k * error) can tell harmful from good updates on these data, which other
scores could, and which `-error` would flag at most 5% of good single-image updates.

Writes in --out: detectability_raw.csv (one row per candidate), detectability_table.csv and
detectability.md (per group), detectability.json (summary), detectability.png (plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
import pandas as pd

from dqc import defaults
from dqc.cli import Parser, add_batch_size_flag, check_positive, run_main
from dqc.data import (check_shape, image_shape, image_to_array, load_table, read_image,
                      require_both_classes)
from dqc.errors import DQCError
from dqc.harmful import HARMFUL_TYPES, LABEL_TYPES, _image_seed, check_types
from dqc.progress import progress
from dqc.qc import TOLERANCE, Evaluation, evaluate_predictions, is_harmful, roc_auc

if TYPE_CHECKING:
    from dqc.trainer import Trainer

GOOD = "good"
SINGLE = " single"
#: Per-candidate changes against the baseline (and the candidate's own loss), in table order.
CHANGES = ("dFP", "dFN", "dFPR", "dFNR", "rate_rise", "d_val_loss", "d_val_auroc", "own_loss")
RAW_COLUMNS = ("group", "kind", "type", "center", "subjects", "n_images", "n_harmful",
               *CHANGES, "flagged_by_rule")
#: Scores by which harmful updates might be told from good ones (higher = more harmful).
SCORES = {"rate_rise": "rate rise", "d_val_loss": "val loss rise",
          "auroc_drop": "AUROC drop", "own_loss": "own loss"}
#: Share of good single-image updates the calibrated thresholds may flag.
FALSE_FLAG_FRACTION = 0.05
OUTPUT_FILES = {"raw": "detectability_raw.csv", "table": "detectability_table.csv",
                "markdown": "detectability.md", "json": "detectability.json",
                "plot": "detectability.png"}


# --- candidates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One update to measure: images of one center, and how they are harmful if they are.

    `corrupt` names a harmful type applied in memory (paired design); None means the images
    and labels are used as the training CSV has them.
    """

    group: str
    kind: str                  # "batch" or "single"
    type: str                  # "good" or a harmful type
    center: str
    subjects: tuple[str, ...]
    n_harmful: int
    corrupt: str | None = None


def _draw_batches(rng: np.random.Generator, first: dict[str, list[str]],
                  filler: dict[str, list[str]], n: int, size: int) -> list[tuple[str, list[str]]]:
    """n batches of `size` images from one center each: up to `size` of the center's `first`
    images, topped up with its `filler` images. A center is drawn with probability
    proportional to its number of `first` images (large centers train more batches)."""
    eligible = [c for c, ids in first.items() if ids and len(ids) + len(filler.get(c, [])) >= size]
    if not eligible:
        return []
    weights = np.array([len(first[c]) for c in eligible], float)
    out = []
    for i in rng.choice(len(eligible), size=n, p=weights / weights.sum()):
        center = eligible[int(i)]
        main = list(rng.permutation(first[center])[:size])
        rest = list(rng.permutation(filler.get(center, []))[:size - len(main)])
        out.append((center, [str(s) for s in main + rest]))
    return out


def _draw_singles(rng: np.random.Generator, table: pd.DataFrame,
                  n: int) -> list[tuple[str, list[str]]]:
    """Up to n distinct single images (a repeated one would only repeat its numbers)."""
    picks = rng.choice(len(table), size=min(n, len(table)), replace=False)
    return [(str(table.Study.iloc[int(i)]), [str(table.Subject.iloc[int(i)])]) for i in picks]


def _by_center(table: pd.DataFrame) -> dict[str, list[str]]:
    return {str(k): list(v) for k, v in table.groupby("Study", sort=False)["Subject"]}


def _harmful_types(table: pd.DataFrame) -> pd.Series:
    """The type of each row: `good`, or the CSV's HarmfulType (`harmful` when not given)."""
    if "Harmful" not in table.columns:
        return pd.Series(GOOD, index=table.index)
    kinds = (table["HarmfulType"].fillna("").astype(str).str.strip()
             if "HarmfulType" in table.columns else pd.Series("", index=table.index))
    return kinds.where(kinds != "", "harmful").where(table.Harmful == 1, GOOD)


def plan_candidates(table: pd.DataFrame, types: Sequence[str] | None = None, n: int = 20,
                    batch_size: int = defaults.BATCH_SIZE, seed: int = 0) -> list[Candidate]:
    """The candidates of every group, drawn reproducibly from the training table.

    Groups: `good` (n batches of one center's good images), one batch group per harmful
    type, `good single`, and `<type> single` (at most n distinct images each). With `types`,
    harmful candidates are the good ones' images corrupted (paired); without, they come from
    the table's Harmful rows (a center with fewer than `batch_size` of them fills its batch
    with its own good images; a center that cannot fill one is left out).
    """
    check_settings(n, batch_size)
    rng = np.random.default_rng(seed)
    kinds = _harmful_types(table)
    good = table[kinds == GOOD]
    batches = {GOOD: _draw_batches(rng, _by_center(good), {}, n, batch_size)}
    singles = {GOOD: _draw_singles(rng, good, n)}
    if types is not None:
        for t in check_types(types):
            batches[t], singles[t] = batches[GOOD], singles[GOOD]
    else:
        names = list(dict.fromkeys(kinds[kinds != GOOD]))
        if not names:
            raise DQCError("the training CSV has no Harmful rows: give --types to make harmful "
                           "candidates from the good images")
        for t in names:
            rows = table[kinds == t]
            batches[t] = _draw_batches(rng, _by_center(rows), _by_center(good), n, batch_size)
            singles[t] = _draw_singles(rng, rows, n)
    harmful = set(table.Subject[kinds != GOOD])
    out = []
    for kind, draws, suffix in (("batch", batches, ""), ("single", singles, SINGLE)):
        for t, picks in draws.items():
            if not picks:
                raise DQCError(_no_candidates(t + suffix, kind, t, batch_size))
            corrupt = t if types is not None and t != GOOD else None
            out += [Candidate(t + suffix, kind, t, center, tuple(ids),
                              len(ids) if corrupt else sum(s in harmful for s in ids), corrupt)
                    for center, ids in picks]
    return out


def _no_candidates(group: str, kind: str, t: str, batch_size: int) -> str:
    what = "good images" if t == GOOD else f"{t} images (with the center's good ones)"
    if kind == "batch":
        return (f"group '{group}' has no candidates: no center has {batch_size} {what}; "
                "lower -batch_size")
    return f"group '{group}' has no candidates: the training CSV has no {what}"


def candidate_arrays(candidate: Candidate, table: pd.DataFrame, shape: tuple[int, int, int],
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The candidate's (x, y) batch as the model takes it.

    A paired harmful image is corrupted in memory with the per-image seed that
    `dqc.harmful.build_scenario` uses for its copy `<subject>_harm_<type>`, so an image gets
    the same corruption in every candidate it belongs to; label types flip y instead.
    """
    rows = table.set_index("Subject")
    kind = candidate.corrupt
    x = np.empty((len(candidate.subjects), *shape, 1), np.float32)
    for i, subject in enumerate(candidate.subjects):
        path = rows.at[subject, "Path"]
        image = read_image(path, subject)
        if kind is not None and kind not in LABEL_TYPES:
            rng = np.random.default_rng(_image_seed(seed, f"{subject}_harm_{kind}"))
            image = HARMFUL_TYPES[kind](image, rng)
        array = image_to_array(image)
        check_shape(array.shape, shape, path, subject)
        x[i, ..., 0] = array
    y = rows.loc[list(candidate.subjects), "Group_bin"].to_numpy(np.float32)
    return x, (1 - y if kind in LABEL_TYPES else y)


# --- measuring -------------------------------------------------------------------------------

class Updatable(Protocol):
    """What `measure` needs of a model (`dqc.trainer.Trainer` has it)."""

    def snapshot(self) -> object: ...
    def restore(self, snapshot: object) -> None: ...
    def set_learning_rate(self, value: float) -> None: ...
    def train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]: ...


def candidate_row(candidate: Candidate, ref: Evaluation, new: Evaluation, own_loss: float,
                  error: float) -> dict:
    """One raw row: the candidate and its changes against the baseline `ref`."""
    d_fpr, d_fnr = new.fpr - ref.fpr, new.fnr - ref.fnr
    k = len(candidate.subjects)
    return {"group": candidate.group, "kind": candidate.kind, "type": candidate.type,
            "center": candidate.center, "subjects": ";".join(candidate.subjects),
            "n_images": k, "n_harmful": candidate.n_harmful,
            "dFP": new.fp - ref.fp, "dFN": new.fn - ref.fn, "dFPR": d_fpr, "dFNR": d_fnr,
            "rate_rise": max(d_fpr, d_fnr), "d_val_loss": new.loss - ref.loss,
            "d_val_auroc": new.auroc - ref.auroc, "own_loss": float(own_loss),
            "flagged_by_rule": int(is_harmful(new, ref, k, error))}


def measure(model: Updatable, candidates: Sequence[Candidate],
            data: Callable[[Candidate], tuple[np.ndarray, np.ndarray]],
            evaluate: Callable[[], np.ndarray], y_val: np.ndarray, *, error: float,
            learning_rate: float, hold_out_momentum: bool = False,
            verbose: bool = True) -> tuple[pd.DataFrame, Evaluation]:
    """One step per candidate from the same state; returns the raw rows and the baseline.

    `evaluate()` gives the validation scores of the current model (injectable, so tests can
    use a stand-in); `dqc.qc.evaluate_predictions` turns them into errors, rates,
    cross-entropy and AUROC. The learning rate is set after the snapshot, so restoring it
    puts the loaded rate back too: the model leaves exactly as it came, even on an exception.
    With `hold_out_momentum` each step is taken with Adam's first moments zeroed (the check
    step of QC criterion `heldout`; the model then needs a `hold_out_momentum()` method).
    """
    base = evaluate_predictions(y_val, evaluate())
    snapshot = model.snapshot()
    rows = []
    try:
        for candidate in progress(candidates, desc="candidates", disable=not verbose):
            x, y = data(candidate)
            model.set_learning_rate(learning_rate)
            if hold_out_momentum:
                model.hold_out_momentum()  # type: ignore[attr-defined]
            own_loss, _ = model.train_step(x, y)
            after = evaluate_predictions(y_val, evaluate())
            model.restore(snapshot)
            rows.append(candidate_row(candidate, base, after, own_loss, error))
    finally:
        model.restore(snapshot)
    return pd.DataFrame(rows, columns=list(RAW_COLUMNS)), base


# --- summary ---------------------------------------------------------------------------------

def separability(harmful_scores: Sequence[float], good_scores: Sequence[float]) -> float:
    """ROC AUC of harmful (positive) against good updates by a score, higher = more harmful.

    0.5 means the score cannot tell them apart (ties count half), 1 that every harmful update
    scores above every good one. NaN when either side is empty.
    """
    h = np.asarray(harmful_scores, float).reshape(-1)
    g = np.asarray(good_scores, float).reshape(-1)
    return roc_auc(np.r_[np.ones(h.size), np.zeros(g.size)], np.r_[h, g])


def calibrated_threshold(values: Sequence[float], fraction: float = FALSE_FLAG_FRACTION) -> float:
    """The smallest threshold e >= 0 at which at most floor(fraction * n) values exceed e.

    e is 0 or one of the values, so a rule that flags `value > e` flags at most that share of
    these (good) updates. Never negative: a negative -error is not a valid setting. NaN for
    no values.
    """
    v = np.asarray(values, float).reshape(-1)
    if v.size == 0:
        return float("nan")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    allowed = math.floor(fraction * v.size + 1e-9)  # 0.29 * 100 is 28.999...
    thresholds = np.unique(np.r_[0.0, v[v > 0]])  # ascending; nothing exceeds the last
    exceeding = np.array([np.sum(v > e) for e in thresholds])
    return float(thresholds[np.argmax(exceeding <= allowed)])


def scores(raw: pd.DataFrame) -> pd.DataFrame:
    """The `SCORES` of every raw row (higher = more harmful)."""
    return pd.DataFrame({"rate_rise": raw.rate_rise, "d_val_loss": raw.d_val_loss,
                         "auroc_drop": -raw.d_val_auroc, "own_loss": raw.own_loss},
                        index=raw.index)


def _flagged(part: pd.DataFrame, error: float) -> float:
    """Share of the rows the paper's rule flags at `error`: a rise of either rate by more than
    k * error (k images), against the baseline (`dqc.qc.is_harmful`, same arithmetic)."""
    if math.isnan(error):
        return float("nan")
    return float((part.rate_rise > part.n_images * error + TOLERANCE).mean())


def summarize(raw: pd.DataFrame, error: float,
              fraction: float = FALSE_FLAG_FRACTION) -> tuple[pd.DataFrame, dict]:
    """Per group: n, mean and sd of each change, share flagged, separability from the good
    updates of the same kind by each score; and the calibrated -error and loss tolerance."""
    good_singles = raw[(raw.kind == "single") & (raw.type == GOOD)]
    cal_error = calibrated_threshold(good_singles.rate_rise, fraction)
    cal_loss = calibrated_threshold(good_singles.d_val_loss, fraction)
    score = scores(raw)
    rows = []
    for group, part in raw.groupby("group", sort=False):
        kind, kind_type = part.kind.iloc[0], part.type.iloc[0]
        row = {"group": group, "kind": kind, "type": kind_type, "n": len(part)}
        for change in CHANGES:
            row[f"{change}_mean"] = float(part[change].mean())
            row[f"{change}_sd"] = float(part[change].std())
        row["flagged"] = _flagged(part, error)
        row["flagged_calibrated"] = _flagged(part, cal_error)
        good = raw.index[(raw.kind == kind) & (raw.type == GOOD)]
        for name in SCORES:
            row[f"auc_{name}"] = (float("nan") if kind_type == GOOD else
                                  separability(score.loc[part.index, name], score.loc[good, name]))
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = {
        "error": error,
        "false_flag_fraction": fraction,
        "good_singles": int(len(good_singles)),
        "calibrated_error": cal_error,
        "calibrated_loss_tolerance": cal_loss,
        "groups": {r["group"]: {
            "kind": r["kind"], "type": r["type"], "n": r["n"],
            "mean": {c: r[f"{c}_mean"] for c in CHANGES},
            "sd": {c: r[f"{c}_sd"] for c in CHANGES},
            "flagged": r["flagged"], "flagged_calibrated": r["flagged_calibrated"],
            "separability": None if r["type"] == GOOD else
            {name: r[f"auc_{name}"] for name in SCORES}} for r in rows},
    }
    return table, summary


def _json_ready(value):
    """NaN -> null, numpy scalars -> Python: strict JSON that other tools read."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean_sd(mean: float, sd: float, digits: int) -> str:
    if math.isnan(sd):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}"


def _number(value: float, fmt: str = ".2f") -> str:
    return "–" if value is None or math.isnan(value) else format(value, fmt)


def markdown(table: pd.DataFrame, summary: dict) -> str:
    """detectability.md: settings, baseline, the per-group table and the calibration."""
    digits = {"dFP": 2, "dFN": 2, "dFPR": 3, "dFNR": 3, "rate_rise": 3, "d_val_loss": 4,
              "d_val_auroc": 4, "own_loss": 3}
    head = (["group", "n"] + [c.replace("_", " ") for c in CHANGES]
            + [f"flagged at {summary['error']:g}"] + [f"AUC {s}" for s in SCORES.values()])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r.group), str(r.n)]
        cells += [_mean_sd(r[f"{c}_mean"], r[f"{c}_sd"], digits[c]) for c in CHANGES]
        cells += [f"{r.flagged:.0%}"] + [_number(r[f"auc_{s}"]) for s in SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    s, base = summary, summary.get("baseline", {})
    text = ["# Detectability of single updates", ""]
    if base:
        held = " with Adam's first moments held out" if s.get("hold_out_momentum") else ""
        text += [f"One training step{held} per candidate from one model state, learning rate "
                 f"{s['learning_rate']:.3g} (cycle {s['cycle']}); validation set of "
                 f"{base['n_hc'] + base['n_pd']} images ({base['n_pd']} PD, {base['n_hc']} HC): "
                 f"baseline FP {base['fp']}, FN {base['fn']}, loss {base['val_loss']:.4f}, "
                 f"AUROC {base['val_auroc']:.3f}.", ""]
    text += lines + ["",
                     "Changes are mean ± sd over the group's candidates, against the unchanged "
                     "model. AUC: separability of the harmful group from the good updates of "
                     "the same size by that score (0.5 = none, 1 = perfect; small groups: "
                     "directions, not values).", ""]
    flagged = ", ".join(f"{g} {_number(v['flagged_calibrated'], '.0%')}"
                        for g, v in s["groups"].items())
    text += [f"Calibrated -error (at most {s['false_flag_fraction']:.0%} of the "
             f"{s['good_singles']} good single-image updates flagged): "
             f"{_number(s['calibrated_error'], '.4g')}; the rule then flags: {flagged}.",
             f"Calibrated validation-loss tolerance (same construction on the loss change): "
             f"{_number(s['calibrated_loss_tolerance'], '.4g')}.", ""]
    return "\n".join(text)


# --- the instrument --------------------------------------------------------------------------

def check_settings(n: int, batch_size: int, error: float = 0.0) -> None:
    check_positive("-n", n)
    check_positive("-batch_size", batch_size)
    if error < 0:
        raise DQCError(f"-error must be 0 or more, got {error}")


def validation_scorer(trainer: Trainer, val_table: pd.DataFrame,
                      verbose: bool = True) -> Callable[[], np.ndarray]:
    """Predicts the validation set, held once on the device (as `runs.validation_evaluator`)."""
    from dqc.model import input_shape
    from dqc.volumes import VolumeStore

    store = VolumeStore(val_table, input_shape(trainer.encoder), desc="validation images",
                        verbose=verbose)
    x = trainer.on_device(store.stacked(list(val_table.Subject)))
    return lambda: trainer.predict(x)


def write_outputs(out: str | Path, raw: pd.DataFrame, table: pd.DataFrame,
                  summary: dict) -> dict[str, Path]:
    """The five files, each written atomically."""
    from dqc.io import write_csv, write_json, write_text
    from dqc.plots import plot_detectability

    paths = {k: Path(out) / name for k, name in OUTPUT_FILES.items()}
    write_csv(paths["raw"], raw)
    write_csv(paths["table"], table)
    write_text(paths["markdown"], markdown(table, summary))
    write_json(paths["json"], _json_ready(summary), allow_nan=False)
    plot_detectability(raw, paths["plot"], summary["error"], summary["calibrated_error"],
                       summary["calibrated_loss_tolerance"])
    return paths


def run_instrument(trainer: Trainer, train_table: pd.DataFrame, val_table: pd.DataFrame, *,
                   types: Sequence[str] | None = None, n: int = 20,
                   batch_size: int = defaults.BATCH_SIZE,
                   error: float = defaults.ERROR, cycle: int = defaults.START_CYCLE, seed: int = 0, out: str | Path = ".",
                   evaluate: Callable[[], np.ndarray] | None = None,
                   hold_out_momentum: bool = False, verbose: bool = True) -> dict:
    """Plan, measure, summarize and write; returns the summary (what detectability.json holds).

    `trainer` is a `dqc.trainer.Trainer` (left exactly as it came); the tables are
    `dqc.data.load_table` results. `evaluate` replaces the validation-set prediction.
    """
    from dqc.model import input_shape
    from dqc.trainer import learning_rate

    check_settings(n, batch_size, error)
    require_both_classes(val_table, "validation set")
    candidates = plan_candidates(train_table, types, n, batch_size, seed)
    shape = input_shape(trainer.encoder)
    rows = train_table.set_index("Subject")
    for subject in dict.fromkeys(s for c in candidates for s in c.subjects):
        path = rows.at[subject, "Path"]
        check_shape(image_shape(path, subject), shape, path, subject)
    evaluate = evaluate or validation_scorer(trainer, val_table, verbose)
    lr = learning_rate(cycle)
    raw, base = measure(trainer, candidates,
                        lambda c: candidate_arrays(c, train_table, shape, seed), evaluate,
                        val_table.Group_bin.to_numpy(), error=error, learning_rate=lr,
                        hold_out_momentum=hold_out_momentum, verbose=verbose)
    table, summary = summarize(raw, error)
    n_pd = int(val_table.Group_bin.sum())
    summary = {"cycle": cycle, "learning_rate": lr, "n": n, "batch_size": batch_size,
               "seed": seed, "types": list(types) if types is not None else None,
               "hold_out_momentum": hold_out_momentum,
               "baseline": {"fp": base.fp, "fn": base.fn, "fpr": base.fpr, "fnr": base.fnr,
                            "acc": base.acc, "val_loss": base.loss, "val_auroc": base.auroc,
                            "n_hc": len(val_table) - n_pd, "n_pd": n_pd},
               **summary}
    write_outputs(out, raw, table, summary)
    return summary


def summary_line(summary: dict, out: str | Path) -> str:
    flagged = ", ".join(f"{g} {v['flagged']:.0%}" for g, v in summary["groups"].items())
    return (f"flagged at -error {summary['error']:g}: {flagged}; calibrated -error "
            f"{_number(summary['calibrated_error'], '.4g')}, loss tolerance "
            f"{_number(summary['calibrated_loss_tolerance'], '.4g')} -> "
            f"{Path(out) / OUTPUT_FILES['markdown']}")


# --- command line ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = Parser(prog="python -m dqc.detectability", description=__doc__)
    p.add_argument("-en", required=True, help="encoder file (.keras or .h5)")
    p.add_argument("-pd", required=True, help="classifier file; its PREFIX_state_CCC.npz "
                   "beside it carries the optimizer state")
    p.add_argument("-fn_train", required=True, help="training CSV the candidates come from "
                   "(optional Harmful and HarmfulType columns, as generate_data writes)")
    p.add_argument("-fn_test", required=True, help="the server's validation CSV (both classes)")
    p.add_argument("--types", default=None, help="comma list of harmful types made on the "
                   f"fly from the good candidates' images ({', '.join(HARMFUL_TYPES)}); "
                   "default: the training CSV's Harmful rows by HarmfulType")
    p.add_argument("-n", type=int, default=20, help="candidates per group")
    add_batch_size_flag(p, help="images per batch candidate")
    p.add_argument("-error", type=float, default=defaults.ERROR, help="the QC rule's e (flag a rise "
                   "of either rate by more than k * e)")
    p.add_argument("--cycle", type=int, default=defaults.START_CYCLE, help="train at this cycle's learning rate")
    p.add_argument("--hold-out-momentum", action="store_true", help="take each step with "
                   "Adam's first moments zeroed, as QC criterion heldout checks an update")
    p.add_argument("--seed", type=int, default=0, help="draws candidates and corruptions")
    p.add_argument("--out", default=".", help="folder for the detectability_* files")
    p.add_argument("--eval-batch-size", type=int, default=defaults.EVAL_BATCH_SIZE,
                   help="images per forward pass when evaluating")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    types = check_types(args.types.split(",")) if args.types is not None else None
    check_settings(args.n, args.batch_size, args.error)
    check_positive("--eval-batch-size", args.eval_batch_size)
    train = load_table(args.fn_train, "train")
    val = load_table(args.fn_test, "validation")
    require_both_classes(val, args.fn_test)
    plan_candidates(train, types, args.n, args.batch_size, args.seed)  # fails before loading
    from dqc.checkpoint import load_trainer  # imports Keras: only once the inputs are checked
    from dqc.runtime import setup_runtime

    setup_runtime(args.seed)
    trainer, _ = load_trainer(args.en, args.pd, eval_batch_size=args.eval_batch_size)
    summary = run_instrument(trainer, train, val, types=types, n=args.n,
                             batch_size=args.batch_size, error=args.error, cycle=args.cycle,
                             seed=args.seed, out=args.out,
                             hold_out_momentum=args.hold_out_momentum, verbose=not args.quiet)
    print(summary_line(summary, args.out))
    return 0


if __name__ == "__main__":
    run_main(main)
