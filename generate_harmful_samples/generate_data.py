"""Generate harmful MRI volumes: one file (-i/-o/--type) or a whole training scenario (--csv/--out).

The authors' file name, and their command line runs as it is; the code is `dqc.scripts.harmful`, which the installed
command `dqc-harmful` runs too. `python generate_data.py --help` lists the flags.
"""

from dqc.cli import run_main
from dqc.scripts.harmful import main

if __name__ == "__main__":
    run_main(main)
