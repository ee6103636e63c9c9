"""`--lr-schedule`: continue our decay (default) or restart it like the authors' dirty/QC
scripts, counting from the run's start cycle even across a resume."""

from __future__ import annotations

import math
import runpy

import keras
import numpy as np
import pytest
from helpers import ROOT

from dqc import checkpoint
from dqc.trainer import cycle_learning_rate

SCRIPT = ROOT / "dirty_baselines" / "enc_PD_train_dirt_baseline.py"


def test_continue_is_the_plain_decay():
    for first in (0, 10):
        for c in range(first, first + 5):
            assert cycle_learning_rate(c, first, "continue") == \
                pytest.approx(1e-4 * math.exp(-0.1 * c), rel=1e-12)


def test_restart_keeps_the_loaded_rate_then_decays_from_the_start_cycle():
    assert cycle_learning_rate(10, 10, "restart") == pytest.approx(1e-4 * math.exp(-1.0))
    assert cycle_learning_rate(11, 10, "restart") == pytest.approx(1e-4 * math.exp(-0.1))
    assert cycle_learning_rate(13, 10, "restart") == pytest.approx(1e-4 * math.exp(-0.3))
    # from a fresh start the two schedules are the same
    assert all(cycle_learning_rate(c, 0, "restart") == cycle_learning_rate(c, 0, "continue")
               for c in range(5))
    with pytest.raises(ValueError):
        cycle_learning_rate(3, 0, "warm")


def test_dirty_script_trains_each_cycle_at_the_restarted_rate(tmp_path, pretrained_one):
    """Cycles 5 and 6, then cycle 7 after --resume: 1e-4 * exp(-0.5), exp(-0.1), exp(-0.2)."""
    cohort = pretrained_one
    out = tmp_path / "dirty"
    main = runpy.run_path(str(SCRIPT))["main"]
    common = ["-fn_train", str(cohort["train"]), "-en", str(cohort["encoder"]),
              "-pd", str(cohort["classifier"]), "--start-cycle", "5", "--lr-schedule",
              "restart", "--out", str(out), "--quiet"]
    seen: list[float] = []
    real_save = checkpoint.save_cycle

    def spy(trainer, *args, **kwargs):
        seen.append(float(keras.ops.convert_to_numpy(trainer.optimizer.learning_rate)))
        return real_save(trainer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_cycle", spy)
        main([*common, "-cycles", "7"])
        main([*common, "-cycles", "8", "--resume"])
    expected = {5: 1e-4 * math.exp(-0.5), 6: 1e-4 * math.exp(-0.1), 7: 1e-4 * math.exp(-0.2)}
    assert seen == [np.float32(expected[c]) for c in (5, 6, 7)]  # the optimizer's rate
    for c, rate in expected.items():
        meta, _ = checkpoint.read_state(checkpoint.cycle_paths(out, "dirty", c)["state"])
        assert meta["learning_rate"] == pytest.approx(rate, rel=1e-12)
