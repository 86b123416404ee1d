"""CLI: `pgolf sweep`, `pgolf results`, `pgolf report`."""

from pathlib import Path

from pgolf.errors import UserError

DEFAULT_RESULTS_DB = "runs/results.sqlite"


def add_experiments_commands(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a sweep spec (JSON/TOML): grid x seeds, resumable")
    p.add_argument("spec", help="sweep spec file (.json or .toml)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids, one run per GPU in parallel (e.g. 0,1)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("results", help="print the runs in the results database")
    p.add_argument("--db", default=DEFAULT_RESULTS_DB, help=f"results database (default {DEFAULT_RESULTS_DB})")
    p.add_argument("--sweep", default=None, help="only this sweep")
    p.add_argument("--csv", default=None, help="also write every column to this CSV file")
    p.add_argument("--ingest", nargs="*", default=[], help="run dirs or record.json files to add first")
    p.set_defaults(func=cmd_results)

    p = subparsers.add_parser("report", help="write report.md and figures from the results database")
    p.add_argument("--db", default=DEFAULT_RESULTS_DB, help=f"results database (default {DEFAULT_RESULTS_DB})")
    p.add_argument("--sweep", default=None, help="only this sweep")
    p.add_argument("--baseline", default=None, help="arm to compare against (its label); default: the first")
    p.add_argument("--out", required=True, help="output folder for report.md and the PNG figures")
    p.set_defaults(func=cmd_report)


def cmd_sweep(args) -> int:
    from pgolf.experiments.sweep import expand_sweep, load_sweep_spec, run_sweep, train_command

    spec = load_sweep_spec(args.spec)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or None
    if args.dry_run:
        for run in expand_sweep(spec):
            print(f"{run.name}: {' '.join(train_command(run, spec.out, spec.command))}")
        return 0
    counts = run_sweep(spec, gpus=gpus)
    print(f"[sweep] {spec.name}: {counts['ran']} ran, {counts['skipped']} already finished, "
          f"{counts['failed']} failed; results in {spec.db}")
    return 1 if counts["failed"] else 0


def cmd_results(args) -> int:
    from pgolf.experiments.results import export_csv, format_results_table, ingest_record, query_runs

    if not args.ingest and not Path(args.db).exists():
        raise UserError(f"{args.db}: no results database here (run a sweep, or pass --ingest RUN_DIR)")
    for item in args.ingest:
        ingest_record(args.db, item, sweep=args.sweep)
    rows = query_runs(args.db, sweep=args.sweep)
    print(format_results_table(rows))
    if args.csv:
        n = export_csv(args.db, args.csv, sweep=args.sweep)
        print(f"wrote {n} rows to {args.csv}")
    return 0


def cmd_report(args) -> int:
    from pgolf.experiments.report import write_report

    if not Path(args.db).exists():
        raise UserError(f"{args.db}: no results database here")
    path = write_report(args.db, args.out, sweep=args.sweep, baseline=args.baseline)
    print(f"wrote {path}")
    return 0
