"""``check MODEL --baseline PROFILE``: fail (exit 1) when the heads drifted from a saved profile."""

from __future__ import annotations

from qkweights.cli.common import add_model_arguments, add_quiet, model_options, print_notes
from qkweights.cli.exits import EXIT_FINDINGS, EXIT_OK
from qkweights.cli.progress import Terminal
from qkweights.cli.words import flag_words
from qkweights.outputs import check_file_target, write_json, write_text
from qkweights.weights.check import SUMMARY_LINES, Tolerances
from qkweights.workflow import check


def configure(p) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--baseline",
        required=True,
        metavar="PROFILE_JSON",
        help="saved profile.json (or its folder) from `python -m qkweights profile`",
    )
    p.add_argument(
        "--tol-layer",
        type=float,
        default=0.02,
        help="allowed absolute change of a layer's mean weighted cosine (default: 0.02)",
    )
    p.add_argument(
        "--tol-head",
        type=float,
        default=0.05,
        help="allowed absolute change of a head's weighted cosine (default: 0.05)",
    )
    p.add_argument(
        "--tol-sigma",
        type=float,
        default=0.01,
        help="allowed relative change of each of a head's top singular values (default: 0.01)",
    )
    p.add_argument(
        "--top-sigma",
        type=int,
        default=5,
        metavar="N",
        help="how many of the largest singular values per head --tol-sigma covers (default: 5)",
    )
    p.add_argument(
        "--tol-symmetry",
        type=float,
        metavar="TOL",
        help="also check each head's symmetric_fraction: allowed absolute change (default: not checked)",
    )
    p.add_argument(
        "--tol-ov",
        type=float,
        metavar="TOL",
        help=(
            "also check the λ-weighted cosine of each head's value-output circuit: allowed absolute change (default: "
            "not checked)"
        ),
    )
    p.add_argument("--report", metavar="FILE", help="write every check as JSON (schema qkweights.check/1)")
    p.add_argument(
        "--junit", metavar="FILE", help="write JUnit XML, one test case per check group, for CI test reports"
    )
    add_quiet(p)


def run(args) -> int:
    for target in (args.report, args.junit):
        if target:
            check_file_target(target)  # a bad report path fails before the profile is computed
    with Terminal(quiet=args.quiet) as reporter:
        report = check(
            args.model,
            args.baseline,
            reporter=reporter,
            model_options=model_options(args),
            tolerances=Tolerances(
                layer=args.tol_layer,
                head=args.tol_head,
                sigma=args.tol_sigma,
                top_sigma=args.top_sigma,
                symmetry=args.tol_symmetry,
                ov=args.tol_ov,
            ),
        )
    print_notes(why for _, why in report.skipped)  # gates asked for that could not run, even with --quiet
    if args.report:
        write_json(args.report, report.to_json())
    if args.junit:
        write_text(args.junit, report.to_junit())
    if not args.quiet:
        print(flag_words(report.summary(SUMMARY_LINES)))
    return EXIT_OK if report.passed else EXIT_FINDINGS
