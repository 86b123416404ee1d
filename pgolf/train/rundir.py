"""The run directory of `pgolf train`: a new one (never over a finished run unless asked), or the one --resume
continues (checked for a checkpoint to continue from before anything is built)."""

import json
from pathlib import Path

from pgolf.config import RunConfig, config_from_dict
from pgolf.dist import DistEnv, broadcast_text
from pgolf.errors import UserError
from pgolf.runlog import make_run_dir, read_run_status
from pgolf.train.checkpoint import find_latest_checkpoint


def check_resumable(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """UserError unless run_dir is a run with a complete checkpoint that has not finished (or overwrite)."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.json)")
    status = read_run_status(run_dir)
    if status == "ok" and not overwrite:
        raise UserError(f"--resume {run_dir}: the run has finished (record.json status 'ok'); resuming would "
                        f"overwrite its record, weights and artifact: pass --overwrite to do it anyway")
    if find_latest_checkpoint(run_dir) is None:
        every = cfg.train.checkpoint_every_s
        why = (f"the run saves one every {every:g} s of training and stopped before its first" if every > 0 else
               "checkpoints are off by default (train.checkpoint_every_s=0): start runs with --set "
               "train.checkpoint_every_s=SECONDS to be able to resume them")
        raise UserError(f"--resume {run_dir}: nothing to resume, no complete checkpoint in "
                        f"{run_dir / 'checkpoint'}; {why}")


def open_run_dir(cfg: RunConfig, resume: str | None, denv: DistEnv, overwrite: bool = False) -> Path:
    """The run directory: --resume's (checked on every rank), else a new one rank 0 creates (make_run_dir:
    a finished run is never overwritten unless `overwrite`); rank 0's refusal stops every rank."""
    if resume:
        run_dir = Path(resume)
        check_resumable(run_dir, cfg, overwrite)
        return run_dir
    answer, error = "", None
    if denv.is_main:
        try:
            answer = "ok:" + make_run_dir(cfg, overwrite).name
        except UserError as e:
            answer, error = "error:" + str(e), e
    answer = broadcast_text(answer)
    if error is not None:
        raise error
    if answer.startswith("error:"):
        raise UserError(answer[len("error:"):])
    return Path(cfg.out_dir) / answer[len("ok:"):]


def load_run_config(run_dir) -> RunConfig:
    """The resolved RunConfig saved in a run directory (for --resume)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json)")
    return config_from_dict(json.loads(path.read_text()))


