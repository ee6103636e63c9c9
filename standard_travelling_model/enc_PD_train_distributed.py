"""Standard travelling model: train the encoder + classifier across centers, no quality control.

The authors' file name, and their command line runs as it is; the code is `dqc.scripts.train`, which the installed
command `dqc-train` runs too. `python enc_PD_train_distributed.py --help` lists the flags.
"""

from dqc.cli import run_main
from dqc.scripts.train import main

if __name__ == "__main__":
    run_main(main)
