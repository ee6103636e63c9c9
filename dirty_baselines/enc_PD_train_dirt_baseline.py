"""Dirty baseline: continue the pre-trained travelling model on data with harmful images, no QC.

The authors' file name, and their command line runs as it is; the code is `dqc.scripts.dirty`, which the installed
command `dqc-dirty` runs too. `python enc_PD_train_dirt_baseline.py --help` lists the flags.
"""

from dqc.cli import run_main
from dqc.scripts.dirty import main

if __name__ == "__main__":
    run_main(main)
