"""Sweeps: a spec file (JSON or TOML) expands into named runs; each runs as a `pgolf train` subprocess.

A spec holds:
    name = "lr"                        # optional; default the spec file's stem
    recipe = "tiny"                    # a named recipe (pgolf/recipes.py)
    proxy_seconds = 300                # optional: the one-GPU proxy of the recipe
    out = "runs/lr"                    # where the run directories go
    db = "runs/results.sqlite"         # optional; default <out>/results.sqlite
    seeds = [1, 2, 3]
    command = ["python", "fake.py"]    # optional; default [python, -m, pgolf, train]
    [set]                              # fixed overrides, the same for every run
    "train.max_steps" = 100
    [grid]                             # cartesian product of these values ...
    "optim.matrix_lr" = [0.02, 0.04]
    # ... or runs = [{"model.num_layers" = 9}, {"model.num_layers" = 11}]  (explicit override sets)

A run is finished when its record.json exists with status "ok"; anything else in its directory is a stale
attempt, moved aside to <out>/_stale/ before the run starts again. Finished runs are (re-)ingested into the
results database at the start of every sweep, so a sweep killed at any moment and started again loses no
finished run and duplicates none. A lock file keeps two sweeps off the same out dir, and each child is
told to die with its parent (Linux), so a killed sweep leaves no orphan still writing.
"""

import ctypes
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.config import apply_overrides
from pgolf.errors import UserError
from pgolf.experiments.results import ingest_record, open_results_db
from pgolf.recipes import apply_proxy, get_recipe
from pgolf.runlog import read_run_status

SWEEP_SPEC_KEYS = {"name", "recipe", "proxy_seconds", "out", "db", "seeds", "command", "set", "grid", "runs"}


@dataclass
class SweepSpec:
    name: str
    recipe: str
    out: Path
    db: Path
    seeds: list[int]
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    proxy_seconds: float | None = None
    command: list[str] | None = None


@dataclass
class RunSpec:
    name: str
    recipe: str
    overrides: dict  # the swept settings of this run (its arm), seed excluded
    seed: int
    fixed: dict = field(default_factory=dict)
    proxy_seconds: float | None = None

    def set_args(self) -> list[str]:
        """Every override of the run as "key=value" strings, fixed first, then swept, then the seed."""
        items = {**self.fixed, **self.overrides}
        return [f"{k}={_value_text(v)}" for k, v in items.items()] + [f"train.seed={self.seed}"]


def _value_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_sweep_spec(path) -> SweepSpec:
    """Read and check a JSON or TOML sweep spec; relative out/db paths are taken from the working dir."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read sweep spec ({e.strerror})") from e
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from e
    raw.setdefault("name", path.stem)
    return sweep_spec_from_dict(raw, where=str(path))


def sweep_spec_from_dict(raw: dict, where: str = "sweep spec") -> SweepSpec:
    unknown = sorted(set(raw) - SWEEP_SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid: {sorted(SWEEP_SPEC_KEYS)}")
    for key in ("recipe", "out", "seeds"):
        if key not in raw:
            raise UserError(f"{where}: missing required key {key!r}")
    if raw.get("grid") and raw.get("runs"):
        raise UserError(f"{where}: give either 'grid' or 'runs', not both")
    seeds = raw["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: 'seeds' has duplicates: {seeds}")
    grid = raw.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid[{key!r}] must be a non-empty list of values")
    runs = raw.get("runs") or []
    if not all(isinstance(r, dict) for r in runs):
        raise UserError(f"{where}: 'runs' must be a list of tables/objects of overrides")
    command = raw.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(c, str) for c in command)):
        raise UserError(f"{where}: 'command' must be a list of strings")
    out = Path(raw["out"])
    name = str(raw.get("name") or out.name)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"{where}: sweep name {name!r} may only hold letters, digits, '.', '_' and '-'")
    return SweepSpec(name=name, recipe=str(raw["recipe"]), out=out, db=Path(raw.get("db") or out / "results.sqlite"),
                     seeds=list(seeds), fixed=dict(raw.get("set") or {}), grid=dict(grid), runs=list(runs),
                     proxy_seconds=raw.get("proxy_seconds"), command=command)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-")


def _name_for(overrides: dict, seed: int, short: dict) -> str:
    parts = [_slug(f"{short[k]}={_value_text(v)}") for k, v in overrides.items()]
    return "_".join(parts + [f"s{seed}"]) if parts else f"base_s{seed}"


def expand_sweep(spec: SweepSpec) -> list[RunSpec]:
    """All runs of the sweep, in a stable order, each override set checked against the config tree.

    Names come from the swept overrides and the seed (e.g. `matrix_lr=0.02_s1`): the last component of each
    key, or the whole key where two swept keys share a last component.
    """
    if spec.runs:
        arms = [dict(r) for r in spec.runs]
    elif spec.grid:
        keys = list(spec.grid)
        arms = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    else:
        arms = [{}]
    swept = list(dict.fromkeys(k for arm in arms for k in arm))
    lasts = [k.split(".")[-1] for k in swept]
    short = {k: (last if lasts.count(last) == 1 else k) for k, last in zip(swept, lasts, strict=True)}
    runs = []
    for arm in arms:
        if "train.seed" in arm or "train.seed" in spec.fixed:
            raise UserError(f"sweep {spec.name}: set seeds with 'seeds', not train.seed in an override set")
        for seed in spec.seeds:
            runs.append(RunSpec(_name_for(arm, seed, short), spec.recipe, arm, seed, dict(spec.fixed),
                                spec.proxy_seconds))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"sweep {spec.name}: override sets give the same run name(s) {dupes}")
    for run in runs:
        check_run_config(run)
    return runs


def check_run_config(run: RunSpec) -> None:
    """Build the run's config here, so a bad key or value fails before anything is launched."""
    cfg = get_recipe(run.recipe)
    if run.proxy_seconds:
        apply_proxy(cfg, float(run.proxy_seconds))
    apply_overrides(cfg, run.set_args())


def train_command(run: RunSpec, out_dir: Path, base: list[str] | None = None) -> list[str]:
    """The argv that trains one run: `python -m pgolf train --recipe R --set k=v ... --name N --out DIR`."""
    argv = list(base) if base else [sys.executable, "-m", "pgolf", "train"]
    argv += ["--recipe", run.recipe]
    if run.proxy_seconds:
        argv += ["--proxy", _value_text(run.proxy_seconds)]
    for item in run.set_args():
        argv += ["--set", item]
    return argv + ["--name", run.name, "--out", str(out_dir)]


def run_is_finished(run_dir: Path) -> bool:
    """True when run_dir/record.json exists, reads as a run record and says status "ok"."""
    return read_run_status(run_dir) == "ok"


def _move_aside(run_dir: Path, out: Path) -> None:
    stale_root = out / "_stale"
    stale_root.mkdir(parents=True, exist_ok=True)
    target = stale_root / f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while target.exists():
        target = stale_root / f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}.{n}"
        n += 1
    shutil.move(str(run_dir), str(target))


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL this child when the sweep process dies (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _lock_out_dir(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".sweep.lock", "w")  # noqa: SIM115 - held for the whole sweep
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        handle.close()
        raise UserError(f"{out}: another sweep is running on this out dir") from e
    return handle


def run_sweep(spec: SweepSpec, launcher=None, gpus: list[str] | None = None, log=print) -> dict:
    """Run every unfinished run of the sweep and ingest each finished record into spec.db.

    `launcher(run, out_dir) -> argv` builds each run's command (default: `train_command`). With `gpus`, one
    run per GPU at a time (CUDA_VISIBLE_DEVICES set per child); otherwise one at a time. Returns counts:
    {"skipped", "ran", "failed"}.
    """
    runs = expand_sweep(spec)
    launcher = launcher or (lambda run, out: train_command(run, out, spec.command))
    lock = _lock_out_dir(spec.out)
    try:
        con = open_results_db(spec.db)
        pending, skipped = [], 0
        for run in runs:
            run_dir = spec.out / run.name
            if run_is_finished(run_dir):
                ingest_record(con, run_dir / "record.json", sweep=spec.name, overrides=run.overrides)
                skipped += 1
                continue
            if run_dir.exists():
                log(f"[sweep] {run.name}: unfinished attempt moved to {spec.out / '_stale'}")
                _move_aside(run_dir, spec.out)
            pending.append(run)
        log(f"[sweep] {spec.name}: {len(runs)} runs, {skipped} finished, {len(pending)} to run")
        counts = _launch_all(spec, pending, launcher, gpus or [None], con, log)
        con.close()
    finally:
        lock.close()
    return {"skipped": skipped, **counts}


def _launch_all(spec, pending, launcher, slots, con, log) -> dict:
    """Keep each slot (a GPU id, or None for the one sequential slot) busy until every run is done."""
    logs_dir = spec.out / "_logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    queue = list(pending)
    running = {}  # slot -> (run, Popen, log file)
    ran = failed = 0
    while queue or running:
        for slot in slots:
            if slot in running or not queue:
                continue
            run = queue.pop(0)
            env = dict(os.environ)
            if slot is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            log_file = open(logs_dir / f"{run.name}.log", "w")  # noqa: SIM115 - closed when the child ends
            argv = launcher(run, spec.out)
            log(f"[sweep] start {run.name}" + (f" on GPU {slot}" if slot is not None else ""))
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
            running[slot] = (run, proc, log_file)
        for slot, (run, proc, log_file) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[slot]
            run_dir = spec.out / run.name
            if run_is_finished(run_dir):
                ingest_record(con, run_dir / "record.json", sweep=spec.name, overrides=run.overrides)
                ran += 1
                log(f"[sweep] done {run.name}")
            else:
                if (run_dir / "record.json").exists():
                    ingest_record(con, run_dir / "record.json", sweep=spec.name, overrides=run.overrides)
                failed += 1
                log(f"[sweep] FAILED {run.name} (exit {proc.returncode}); see {logs_dir / (run.name + '.log')}")
        time.sleep(0.05)
    return {"ran": ran, "failed": failed}
