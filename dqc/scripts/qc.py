"""Travelling model with decentralized quality control: verification, revisit, elimination.

Continues a pre-trained model; after every update the server evaluates its validation set and
undoes updates that raise the false-positive or false-negative rate by more than k * error
(k images in the update). Images harmful twice, R cycles apart, are eliminated:

    python enc_PD_quality_control.py -fn_train ./training_set.csv -fn_test ./test_set.csv \
        -cycles 30 -en ./path_encoder -pd ./path_classifier -revisit 2 -error 0.02 -fn_save filename
"""

from dqc.cli import Parser, add_qc_flags, qc_specs


def parse_args(argv=None):
    p = Parser(description=__doc__)
    add_qc_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dqc.runs import run_quality_control  # after parsing: --help needs no TensorFlow

    run_quality_control(*qc_specs(args))

