"""One validation pass, folded (`dqc.folding`) against the layers as trained, by batch size.

    python bench/validation_pass.py                       # the demo's sizes
    python bench/validation_pass.py --shape 80x96x80 --width 1 --n 60

A benchmark, not a test: random uint8 volumes of `--shape`, the model at `--width` with
BatchNorm statistics away from their initial values, each pass timed `--repeats` times after
one untimed pass, in one process (so the two compare on the same machine at the same time).
Prints seconds per pass and the largest score difference from the unfolded pass in batches of
16. The paper's rule makes one such pass after every update.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dqc.runtime import quiet_tensorflow_import

quiet_tensorflow_import()

import keras  # noqa: E402

from dqc.data import parse_shape  # noqa: E402
from dqc.folding import fold  # noqa: E402
from dqc.model import Architecture, build_models, stack  # noqa: E402
from dqc.runtime import setup_runtime  # noqa: E402
from dqc.trainer import predict_in_batches, trace_prediction_for_any_batch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="40x48x40", help="volume shape (the demo's: 40x48x40)")
    p.add_argument("--width", type=float, default=0.5, help="filter-count scale (the demo's: 0.5)")
    p.add_argument("--n", type=int, default=240, help="volumes in the pass (the demo's: 240)")
    p.add_argument("--batches", default="16,40,240", help="batch sizes to time")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting")
    args = p.parse_args()
    setup_runtime(0)
    shape = parse_shape(args.shape)
    encoder, classifier = build_models(shape, Architecture(width=args.width))
    rng = np.random.default_rng(1)
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n))
    head = classifier.get_layer("pd")  # scores away from 0 and 1, so that differences show
    head.kernel.assign(head.kernel * 0.01)
    models = {"unfolded": stack(encoder, classifier), "folded": fold(encoder, classifier)}
    if keras.backend.backend() == "tensorflow":  # one trace for any batch, as a Trainer does
        for model in models.values():
            trace_prediction_for_any_batch(model, (*shape, 1))
    x = keras.ops.convert_to_tensor(rng.integers(0, 256, (args.n, *shape, 1)).astype(np.uint8))
    reference = predict_in_batches(models["unfolded"], x, 16)
    for batch in (int(b) for b in args.batches.split(",")):
        for name, model in models.items():
            scores = predict_in_batches(model, x, batch)
            start = time.perf_counter()
            for _ in range(args.repeats):
                predict_in_batches(model, x, batch)
            seconds = (time.perf_counter() - start) / args.repeats
            print(f"{name:>8}, batches of {batch:>3}: {seconds:6.3f} s per pass of {args.n}; "
                  f"largest score difference {np.abs(scores - reference).max():.1e}", flush=True)


if __name__ == "__main__":
    main()
