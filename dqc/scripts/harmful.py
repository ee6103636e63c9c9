"""Generate harmful MRI volumes: one file (-i/-o/--type) or a whole training scenario (--csv/--out).

Thin wrapper: parses flags, calls `dqc.harmful`, prints one summary line. User errors print
`error: <message>` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse

from dqc.cli import Parser
from dqc.errors import DQCError
from dqc.harmful import HARMFUL_DESCRIPTIONS, build_scenario, make_harmful, scenario_summary


def build_parser() -> argparse.ArgumentParser:
    types = "\n".join(f"  {name:<16} {text}" for name, text in HARMFUL_DESCRIPTIONS.items())
    parser = Parser(
        usage_on_error=False,
        description="Simulate harmful MRI data for the travelling model's quality control.",
        epilog=("modes:\n"
                "  single image: -i IN.nii.gz -o OUT.nii.gz --type TYPE [--seed N]\n"
                "  scenario:     --csv train.csv --out DIR (--whole-centers K | --centers A,B)\n"
                "                [--single-images M] [--types inverted,noise] [--seed N]\n\n"
                f"harmful types:\n{types}"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    single = parser.add_argument_group("single image")
    single.add_argument("-i", "--input", help="input NIfTI volume to corrupt")
    single.add_argument("-o", "--output", help="where to write the harmful volume (.nii.gz)")
    single.add_argument("--type", "-type", dest="kind",
                        help="harmful type to apply (see the list below)")
    scenario = parser.add_argument_group("scenario")
    scenario.add_argument("--csv", help="training CSV (Subject, Study, Path, Group_bin, ...)")
    scenario.add_argument("--out", help="output folder: gets train.csv and images/")
    scenario.add_argument("--whole-centers", type=int, default=0, metavar="K",
                          help="number of centers, chosen at random, whose images all become "
                               "harmful (default 0)")
    scenario.add_argument("--centers", metavar="A,B",
                          help="comma-separated center names (Study values) to make wholly "
                               "harmful, instead of --whole-centers")
    scenario.add_argument("--single-images", type=int, default=0, metavar="M",
                          help="number of other centers that each receive one extra harmful "
                               "copy of one of their own images (default 0)")
    scenario.add_argument("--types", default="inverted,noise", metavar="T1,T2",
                          help="comma-separated harmful types, assigned cyclically per center "
                               "(default inverted,noise)")
    scenario.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: same seed, same output (default 0)")
    return parser


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def run(args: argparse.Namespace) -> str:
    single = any(v is not None for v in (args.input, args.output, args.kind))
    scenario = args.csv is not None or args.out is not None
    if single == scenario:
        raise DQCError("give either -i/-o/--type (one image) or --csv/--out (a scenario)")
    if single:
        missing = [f for f, v in (("-i", args.input), ("-o", args.output), ("--type", args.kind))
                   if v is None]
        if missing:
            raise DQCError(f"single-image mode needs {', '.join(missing)}")
        out = make_harmful(args.input, args.output, args.kind, args.seed)
        return f"wrote {out} ({args.kind}, seed {args.seed})"
    if args.csv is None or args.out is None:
        raise DQCError("scenario mode needs both --csv and --out")
    csv = build_scenario(args.csv, args.out, whole_centers=args.whole_centers,
                         centers=_split(args.centers) or None, single_images=args.single_images,
                         types=_split(args.types), seed=args.seed, verbose=not args.quiet)
    return scenario_summary(csv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(run(args))
    return 0

