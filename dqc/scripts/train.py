"""Standard travelling model: train the encoder + classifier across centers, no quality control.

Gives the clean baseline and the pre-trained model (the paper pre-trains cycles 0..9):

    python enc_PD_train_distributed.py -fn_train ./training_set.csv -cycles 30 -epochs 1 -batch_size 5
"""

from dqc import defaults
from dqc.cli import Parser, add_batch_size_flag, add_run_flags, run_options
from dqc.data import parse_shape
from dqc.errors import DQCError


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("-fn_train", required=True, help="training CSV (Subject, Study, Path, "
                   "Group_bin); relative paths resolve against the CSV's folder")
    p.add_argument("-cycles", type=int, required=True, help="number of cycles; trains cycles "
                   "0..cycles-1, each visiting every center once")
    p.add_argument("-epochs", type=int, default=defaults.EPOCHS, help="local epochs at each center")
    add_batch_size_flag(p, help="batch size; a center with fewer images uses all of them as "
                        "one batch")
    p.add_argument("--image-shape", default=None, help="model input XxYxZ, e.g. 40x48x40 "
                   "(default: the size of the first image)")
    p.add_argument("--width", type=float, default=1.0, help="scale every filter count of the "
                   "model (1 = the paper's SFCN; 0.25 is 16x cheaper in the deep layers); a "
                   "multiple of 1/32. Saved models carry it")
    p.add_argument("--intensity", choices=("raw", "zscore"), default="raw", help="raw: voxel "
                   "values as they are (the authors'); zscore: each volume standardised to "
                   "mean 0, sd 1 inside the model (saved with it, so every later script "
                   "applies it too)")
    add_run_flags(p, seed=defaults.PRETRAIN_SEED, prefix="tm")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dqc.model import Architecture
    from dqc.runs import RunSpec, train_cycles  # after parsing: --help needs no TensorFlow

    try:
        arch = Architecture(width=args.width, intensity=args.intensity)
    except ValueError as exc:
        raise DQCError(f"--width/--intensity: {exc}") from None

    spec = RunSpec(train_csv=args.fn_train, prefix=args.prefix, cycles=range(0, args.cycles),
                   batch_size=args.batch_size, epochs=args.epochs,
                   image_shape=parse_shape(args.image_shape) if args.image_shape else None,
                   arch=arch,
                   **run_options(args))
    train_cycles(spec)

