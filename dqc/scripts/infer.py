"""Inference: score a test set with the travelling model of every cycle (overall, per sex, per age).

-en/-pd take a folder of per-cycle files (PREFIX_encoder_CCC.keras, PREFIX_classifier_CCC.keras)
or one model file each. Writes NAME_metrics.csv (one row per cycle) and NAME_predictions.csv
(one row per cycle and subject) into --out:

    python inference_pd_distributed.py -fn ./test_set.csv -en ./path_encoder \
        -pd ./path_classifier -o filename_to_save
"""

from dqc import defaults
from dqc.cli import Parser


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("-fn", required=True, help="test CSV (Subject, Path, Group_bin, Sex, Age; "
                   "Study optional); relative paths resolve against the CSV's folder")
    p.add_argument("-en", required=True, help="encoder: a folder of PREFIX_encoder_CCC.keras "
                   "(or .h5) files, one per cycle, or a single encoder file")
    p.add_argument("-pd", required=True, help="classifier: a folder of "
                   "PREFIX_classifier_CCC.keras (or .h5) files, or a single classifier file "
                   "(a folder when -en is one)")
    p.add_argument("-o", required=True, metavar="NAME", help="output name: writes "
                   "NAME_metrics.csv and NAME_predictions.csv (NAME may include folders)")
    p.add_argument("--cycles", default=None, metavar="START:END", help="evaluate cycles "
                   "START..END-1 only, or one cycle N (None: every cycle found)")
    p.add_argument("--prefix", default=None, help="the run to evaluate when a model folder "
                   "holds several (PREFIX of PREFIX_encoder_CCC.keras)")
    p.add_argument("--age-bins", default="60,70", help="age cut points; 60,70 gives the groups "
                   "<60, 60-70 and >=70 (left-closed)")
    p.add_argument("--out", default=".", help="folder for the output files (created if missing)")
    p.add_argument("--eval-batch-size", type=int, default=defaults.EVAL_BATCH_SIZE,
                   help="images per forward pass")
    p.add_argument("--plot", action="store_true", help="also write NAME_metrics.png: accuracy, "
                   "sensitivity, specificity, AUROC and F1 across cycles")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None):
    from tqdm.auto import tqdm

    from dqc import inference
    from dqc.cli import check_positive

    args = parse_args(argv)
    check_positive("--eval-batch-size", args.eval_batch_size)
    cycles = inference.parse_cycles(args.cycles) if args.cycles is not None else None
    paths = inference.output_paths(args.out, args.o, plot=args.plot)
    models = inference.find_cycle_models(args.en, args.pd, args.prefix, cycles)
    from dqc.metrics import parse_age_bins  # scikit-learn: after the quick checks

    age_bins = parse_age_bins(args.age_bins)
    metrics, predictions = inference.predict_cycles(
        args.fn, models, args.eval_batch_size, verbose=not args.quiet, age_bins=age_bins,
        report=lambda row: tqdm.write(inference.cycle_line(row)))  # keeps the bar intact
    inference.write_outputs(metrics, predictions, paths)
    for path in paths.values():
        print(f"wrote {path}")

