"""Inference: score a test set with the travelling model of every cycle (overall, per sex, per age).

The authors' file name, and their command line runs as it is; the code is `dqc.scripts.infer`, which the installed
command `dqc-infer` runs too. `python inference_pd_distributed.py --help` lists the flags.
"""

from dqc.cli import run_main
from dqc.scripts.infer import main

if __name__ == "__main__":
    run_main(main)
