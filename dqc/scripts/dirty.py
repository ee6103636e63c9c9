"""Dirty baseline: continue the pre-trained travelling model on data with harmful images, no QC.

Shows how much harmful data hurts when nobody checks it:

    python enc_PD_train_dirt_baseline.py -fn_train ./training_set.csv -en ./path_pretrained_encoder \
        -pd ./path_pretrained_classifier -cycles 30 -epochs 1 -batch_size 5
"""

from dqc import defaults
from dqc.cli import Parser, add_batch_size_flag, add_lr_schedule_flag, add_run_flags, run_options


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("-fn_train", required=True, help="training CSV including the harmful images")
    p.add_argument("-en", required=True, help="pre-trained encoder file (.keras or .h5)")
    p.add_argument("-pd", required=True, help="pre-trained classifier file (.keras or .h5); "
                   "its PREFIX_state_CCC.npz beside it carries the optimizer state")
    p.add_argument("-cycles", type=int, required=True, help="train cycles START..cycles-1")
    p.add_argument("-epochs", type=int, default=defaults.EPOCHS, help="local epochs at each center")
    add_batch_size_flag(p, help="batch size (min(B, n) at a center of n images)")
    p.add_argument("--start-cycle", type=int, default=defaults.START_CYCLE, help="first cycle (the pre-trained "
                   "model ends at START-1)")
    add_lr_schedule_flag(p)
    add_run_flags(p, seed=defaults.SEED, prefix="dirty")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dqc.runs import RunSpec, train_cycles  # after parsing: --help needs no TensorFlow

    spec = RunSpec(train_csv=args.fn_train, prefix=args.prefix,
                   cycles=range(args.start_cycle, args.cycles), batch_size=args.batch_size,
                   epochs=args.epochs, encoder=args.en, classifier=args.pd,
                   lr_schedule=args.lr_schedule, **run_options(args))
    train_cycles(spec)

