"""Every default of the method and of the runs, once.

The command-line parsers, the run specs, the QC criteria, the demo, the benchmark and the
Flower app's run config take their defaults from here (a test pins the Flower app's TOML,
which cannot import Python, to these values).
"""

#: e: tolerated rise of a rate per image of an update (the paper's value).
ERROR = 0.02
#: R: a flagged image is retried alone R cycles later.
REVISIT = 2
#: Images per update (the authors' BS5).
BATCH_SIZE = 5
#: Images per forward pass when evaluating.
EVAL_BATCH_SIZE = 16
#: The first cycle of a run that continues a pre-trained model (cycles 0..9 pre-train).
START_CYCLE = 10
#: Cycle c shuffles centers and images with SEED + c (the authors' seed).
SEED = 42
#: What makes an update harmful, and the other criteria's parameters (`dqc.qc.Criterion`).
CRITERION = "rates"
#: The criterion the demo and the study run beside the paper's rule (chosen by measurement).
RECOMMENDED_CRITERION = "combined"
ALPHA = 0.05
Z = 3.0
WINDOW = 50
#: The learning rate of a continued run (`dqc.trainer.cycle_learning_rate`).
LR_SCHEDULE = "continue"
