"""The server's run config (Flower style keys: the QC script's flags with dashes, plus the
network's own) and the run specs built from it directly, each value checked.

A key's type is its default's: the QC settings' defaults are `QCSpec`'s fields (which take
them from `dqc.defaults`), so a criterion parameter added there is a run-config key too.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from dqc import defaults
from dqc.errors import DQCError

#: Where each update is verified: on the centers' own validation images (the paper's design:
#: the server holds no image), or on a validation set the server holds.
VERIFY_AT = ("centers", "server")
#: What a faulty node's reply does: stop the run, or leave that center out from then on.
ON_FAULTY_NODE = ("stop", "exclude")
#: Run-config keys of the ServerApp beyond the QC flags (see the Flower app's pyproject.toml).
#: `min-nodes` has none: a consortium run is told how many centers it has.
NETWORK_DEFAULTS = {"verify-at": "centers", "wait-nodes-s": 120.0, "node-timeout-s": 600.0,
                    "poll-s": 0.005, "on-faulty-node": "stop", "ask-truth": False,
                    "no-own-word": False}
#: Keys a run config must give (no default to fall back on); the server needs `min-nodes`
#: too (the specs alone do not).
REQUIRED = {"en": str, "pd": str, "cycles": int, "min-nodes": int}
#: The run's own keys (`dqc.runs.RunSpec`) and their defaults: the QC script's.
RUN_DEFAULTS = {"fn-test": "", "start-cycle": defaults.START_CYCLE, "fn-save": "qc",
                "out": ".", "seed": defaults.SEED, "batch-size": defaults.BATCH_SIZE,
                "lr-schedule": defaults.LR_SCHEDULE, "resume": False,
                "eval-batch-size": defaults.EVAL_BATCH_SIZE, "quiet": False, "no-report": False}


def config_from_args(args: argparse.Namespace) -> dict:
    """Run config (Flower style keys) from `dqc.cli.add_qc_flags` values; no training CSV."""
    skip = {"fn_train", "cache_mb", "no_cache", "mixed_precision", "command", "work", "port",
            "verbose"}
    return {k.replace("_", "-"): v for k, v in vars(args).items()
            if k not in skip and v is not None}


def server_config(args: argparse.Namespace) -> dict:
    """The server's run config from the command line: with verification at the centers it
    does not hold the validation CSV (the nodes do)."""
    config = config_from_args(args)
    if config.get("verify-at") == "centers":
        config.pop("fn-test", None)
    return config


def _qc_defaults() -> dict[str, Any]:
    """The QC settings with a default (`QCSpec`'s fields); the criterion's own parameters
    are `_criterion_keys`."""
    from dqc.runs import QCSpec

    return {f.name.replace("_", "-"): f.default for f in fields(QCSpec)
            if f.default is not MISSING and f.name not in ("name", "error", "report")}


def _criterion_keys() -> dict[str, type]:
    """Every criterion's parameters (`dqc.criteria`) and their types: keys without a default
    here, since each takes its criterion's own default when not given."""
    from dqc.criteria import CRITERIA

    return {f.name: type(f.default) for kind in CRITERIA.values() for f in fields(kind)}


def _typed(key: str, value, kind: type):
    """`value` as `kind`, or one line naming the key: no bool for a number, no text for
    anything but text; an int is a float too."""
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "text"}
        raise DQCError(f"run config: {key} must be {names[kind]}, got {value!r}")
    return value


def read_config(config: dict, serving: bool = True) -> dict[str, Any]:
    """Every key of the run config with its default where it is not given, checked: known
    keys, types, required values (`min-nodes` only when `serving`), choices."""
    known = {**NETWORK_DEFAULTS, **RUN_DEFAULTS, **_qc_defaults()}
    optional = _criterion_keys()
    config = {k: v for k, v in config.items() if not (k in optional and v == "")}  # unset
    unknown = sorted(set(config) - set(known) - set(REQUIRED) - set(optional))
    if unknown:
        raise DQCError(f"run config: unknown key {unknown[0]!r}")
    values = {k: _typed(k, config[k], type(v)) if k in config else v for k, v in known.items()}
    values.update({k: _typed(k, config[k], kind) for k, kind in optional.items() if k in config})
    values.update({k: _typed(k, config[k], kind) for k, kind in REQUIRED.items() if k in config})
    needed = [k for k in REQUIRED if serving or k != "min-nodes"] \
        + (["fn-test"] if values["verify-at"] == "server" else [])
    missing = [k for k in needed if not values.get(k)]
    if missing:
        raise DQCError("run config lacks " + ", ".join(missing)
                       + (" (the number of center nodes to wait for)" if "min-nodes" in missing
                          else ""))
    for key, choices in (("verify-at", VERIFY_AT), ("on-faulty-node", ON_FAULTY_NODE)):
        if values[key] not in choices:
            raise DQCError(f"run config: {key} must be one of {', '.join(choices)}, "
                           f"got {values[key]!r}")
    return values


def specs_from_config(config: dict):
    """(`RunSpec`, `QCSpec`) for the server from a run config (`read_config`): float32,
    images cached (the server holds none with verification at the centers)."""
    from dqc.runs import QCSpec, RunSpec

    v = read_config(config, serving=False)
    spec = RunSpec(train_csv="", out=v["out"], prefix=v["fn-save"],
                   cycles=range(v["start-cycle"], v["cycles"]), seed=v["seed"],
                   batch_size=v["batch-size"], encoder=v["en"], classifier=v["pd"],
                   resume=v["resume"], eval_batch_size=v["eval-batch-size"],
                   verbose=not v["quiet"], lr_schedule=v["lr-schedule"])
    qspec = QCSpec(val_csv=v["fn-test"], name=v["fn-save"], report=not v["no-report"],
                   params={k: v[k] for k in _criterion_keys() if k in v},
                   **{k.replace("-", "_"): v[k] for k in _qc_defaults()})
    return spec, qspec
