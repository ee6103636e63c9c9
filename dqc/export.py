"""Write a model pair of ours in the authors' `.h5` layout, for going back to their scripts.

    python -m dqc.export --authors -en RUN_encoder_029.keras -pd RUN_classifier_029.keras \\
        --out ./models

writes ./models/encoder_distributed_BS5_29.h5 and classifier_PD_distributed_BS5_29.h5, the
names their inference script loads (`-en ./models/ -pd ./models/`). Their Adam state comes
from our state file beside the classifier when there is one.
"""

from __future__ import annotations

import re
from pathlib import Path

from dqc.cli import Parser, add_batch_size_flag, run_main
from dqc.errors import DQCError


def parse_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--authors", action="store_true", required=True,
                   help="write the authors' Keras 2 .h5 layout (the only export there is)")
    p.add_argument("-en", required=True, help="our encoder file (.keras or .h5)")
    p.add_argument("-pd", required=True, help="our classifier file (.keras or .h5)")
    p.add_argument("--out", default=".", help="folder for the two .h5 files")
    p.add_argument("--cycle", type=int, default=None,
                   help="cycle in the file names (default: from the classifier's name)")
    add_batch_size_flag(p, help="the BS<n> in their file names", default=5)
    return p.parse_args(argv)


def file_name(batch_size: int, cycle: int) -> str:
    """`distributed_BS5_09`: what their script puts between `encoder_` and `.h5`."""
    return f"distributed_BS{batch_size}_{cycle:02d}"


def main(argv=None) -> int:
    args = parse_args(argv)
    cycle = args.cycle
    if cycle is None:
        match = re.search(r"_(\d+)$", Path(args.pd).stem)
        if not match:
            raise DQCError(f"-pd {args.pd}: no cycle in its name; give --cycle")
        cycle = int(match[1])
    from dqc.authors import export_pair
    from dqc.checkpoint import load_trainer
    from dqc.trainer import learning_rate

    trainer, _ = load_trainer(args.en, args.pd)
    # their script stores the rate it set for the next cycle: 1e-4 * exp(-0.1 * (cycle + 1))
    paths = export_pair(trainer.encoder, trainer.classifier, args.out,
                        file_name(args.batch_size, cycle), trainer.optimizer,
                        learning_rate(cycle + 1))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    run_main(main)
