"""Travelling model with decentralized quality control: verification, revisit, elimination.

The authors' file name, and their command line runs as it is; the code is `dqc.scripts.qc`, which the installed
command `dqc-qc` runs too. `python enc_PD_quality_control.py --help` lists the flags.
"""

from dqc.cli import run_main
from dqc.scripts.qc import main

if __name__ == "__main__":
    run_main(main)
