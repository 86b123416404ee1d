"""`pgolf export`: the single-file train_gpt.py of a recipe, alone or as a full submission folder."""

from pathlib import Path

from pgolf.config import add_override_argument, apply_overrides
from pgolf.errors import UserError
from pgolf.recipes import add_proxy_argument, recipe_config


def add_export_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="generate train_gpt.py (and a submission folder from finished runs)",
        description="Generate the single-file train_gpt.py of a recipe from the package's modules. With runs "
                    "(--runs or --db), write a submission folder: train_gpt.py, submission.json, README.md, "
                    "requirements.txt and the runs' logs.")
    p.add_argument("--recipe", required=True, help="recipe name (baseline, record, tiny)")
    add_proxy_argument(p)
    add_override_argument(p, "config override baked into the script's defaults")
    p.add_argument("--out", required=True, help="output folder (records/<date>_<name>/), or a .py file path "
                                                "to write only the script")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR", help="finished run directories to report")
    p.add_argument("--baseline-runs", nargs="+", default=[], metavar="RUN_DIR",
                   help="baseline run directories: add the challenge's significance test (>= 0.005 nats, p < 0.01)")
    p.add_argument("--db", help="results database (pgolf results) to take the runs from")
    p.add_argument("--sweep", help="with --db: only the runs of this sweep")
    p.add_argument("--form", choices=("auto", "plain", "compressed"), default="auto",
                   help="script form: auto writes whichever of plain / lzma+base85 is smaller (default)")
    p.add_argument("--keep-docstrings", action="store_true", help="keep docstrings in the script")
    p.add_argument("--keep-comments", action="store_true", help="keep comments in the script")
    p.add_argument("--author", default="", help="submission.json author")
    p.add_argument("--github-id", default="", help="submission.json github_id")
    p.add_argument("--name", default="", help="submission.json name (default: the recipe)")
    p.add_argument("--blurb", default="", help="submission.json blurb")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from pgolf.export.amalgamate import export_script
    from pgolf.export.submission import load_runs, write_submission

    cfg = apply_overrides(recipe_config(args.recipe, args.proxy), args.overrides)
    form = {"compressed": {"auto": "auto", "plain": False, "compressed": True}[args.form],
            "strip_docstrings": not args.keep_docstrings, "strip_comments": not args.keep_comments}
    out = Path(args.out)
    if args.sweep and not args.db:
        raise UserError("--sweep needs --db")
    if not (args.runs or args.db):
        path = out if out.suffix == ".py" else out / "train_gpt.py"
        info = export_script(cfg, path, **form)
        print(f"wrote {path}: {info['bytes']:,} B ({info['form']}; plain {info['plain_bytes']:,} B, compressed "
              f"{info['compressed_bytes']:,} B), {len(info['modules'])} modules; no runs, so no submission.json")
        return 0
    if out.suffix == ".py":
        raise UserError(f"--out {out}: a submission with runs needs a folder, not a .py file")
    runs = load_runs(args.runs, args.db, args.sweep)
    baseline = load_runs(args.baseline_runs) if args.baseline_runs else []
    sub = write_submission(cfg, out, runs, author=args.author, github_id=args.github_id, name=args.name,
                           blurb=args.blurb, baseline_runs=baseline, **form)
    print(f"wrote {out}/: {len(runs)} seeds, val_bpb {sub['val_bpb']:.5f} ± {sub['val_bpb_std']:.5f} (std), "
          f"bytes_total {sub['bytes_total']}, bytes_code {sub['bytes_code']:,}")
    return 0
