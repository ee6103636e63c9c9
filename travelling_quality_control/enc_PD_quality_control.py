"""Travelling model with decentralized quality control: verification, revisit, elimination.

Continues a pre-trained model; after every update the server evaluates its validation set and
undoes updates that raise the false-positive or false-negative rate by more than k * error
(k images in the update). Images harmful twice, R cycles apart, are eliminated:

    python enc_PD_quality_control.py -fn_train ./training_set.csv -fn_test ./test_set.csv \
        -cycles 30 -en ./path_encoder -pd ./path_classifier -revisit 2 -error 0.02 -fn_save filename
"""

from dqc.cli import quiet_backend

quiet_backend()

from dqc.cli import Parser, add_run_flags, run_main, run_options  # noqa: E402


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("-fn_train", required=True, help="training CSV (Subject, Study, Path, "
                   "Group_bin; optional Harmful = ground truth, used only for reporting)")
    p.add_argument("-fn_test", required=True, help="the server's validation CSV used to verify "
                   "every update (keep it apart from the final test set); needs both classes, "
                   "ideally >= 1/error images of each")
    p.add_argument("-cycles", type=int, required=True, help="train cycles START..cycles-1")
    p.add_argument("-en", required=True, help="pre-trained encoder file (.keras or .h5)")
    p.add_argument("-pd", required=True, help="pre-trained classifier file (.keras or .h5); "
                   "its PREFIX_state_CCC.npz beside it carries the optimizer state")
    p.add_argument("-revisit", type=int, default=2, help="R: a flagged image is left out and "
                   "retried alone R cycles later; harmful again means eliminated")
    p.add_argument("-error", type=float, default=0.02, help="e: tolerated rise of either rate "
                   "per image in the update (k * e for k images)")
    p.add_argument("-fn_save", default="qc", help="NAME of the outputs: NAME.csv (log), "
                   "NAME_images.csv, NAME_summary.json and NAME_*_CCC model files")
    p.add_argument("--batch-size", type=int, default=5, help="images per update")
    p.add_argument("--start-cycle", type=int, default=10, help="first cycle (the pre-trained "
                   "model ends at START-1)")
    p.add_argument("--legacy-rates", action="store_true", help="the authors' denominators: "
                   "FP / number of PD and FN / number of HC (default: FP / HC, FN / PD)")
    add_run_flags(p, seed=42, prefix=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dqc.runs import QCSpec, RunSpec, run_quality_control  # after parsing: --help needs no TensorFlow

    spec = RunSpec(train_csv=args.fn_train, prefix=args.fn_save,
                   cycles=range(args.start_cycle, args.cycles), batch_size=args.batch_size,
                   encoder=args.en, classifier=args.pd, **run_options(args))
    qspec = QCSpec(val_csv=args.fn_test, error=args.error, revisit=args.revisit,
                   name=args.fn_save, legacy_rates=args.legacy_rates)
    run_quality_control(spec, qspec)


if __name__ == "__main__":
    run_main(main)
