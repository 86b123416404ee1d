"""The run directory: resolved config, environment fingerprint, metrics stream and the run record.

Layout (docs/architecture.md): runs/<name>/config.json, env.json, metrics.jsonl, checkpoint/, model.pgw,
model.pgq, record.json. Only rank 0 writes; the callers pass `enabled=False` elsewhere.
"""

import contextlib
import hashlib
import json
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from pgolf.config import RunConfig, config_to_dict
from pgolf.errors import UserError
from pgolf.fileio import OutputError, atomic_write_text, os_error_text
from pgolf.runrecord import RECORD_FILE_NAME, read_run_record, record_file_text

# sha256 of files already hashed in this process, keyed by (resolved path, size, mtime_ns).
RUNLOG_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path) -> str:
    """sha256 of a file, computed once per (path, size, mtime) in this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in RUNLOG_HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        RUNLOG_HASH_CACHE[key] = h.hexdigest()
    return RUNLOG_HASH_CACHE[key]


def json_file_text(obj) -> str:
    """The text of a JSON file pgolf writes (records, configs): indented, non-JSON values as strings."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def write_json_atomic(path, obj) -> None:
    """Write obj as indented JSON to path atomically (pgolf.fileio: OutputError naming path on failure)."""
    atomic_write_text(path, json_file_text(obj))


def read_run_status(run_dir) -> str | None:
    """The status in run_dir/record.json ("ok", "nan", "failed"), "unreadable", or None without a record."""
    path = Path(run_dir) / RECORD_FILE_NAME
    if not path.is_file():
        return None
    try:
        return read_run_record(path).status
    except UserError:
        return "unreadable"


def refuse_or_clear_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A named run directory that already holds files: refused, or with overwrite emptied (only a run
    directory, one with config.json), so that no old record, weights or checkpoint mixes into the new run."""
    status = read_run_status(run_dir)
    what = f"a finished run (record.json status {status!r})" if status else "an unfinished run (no record.json)"
    if not overwrite:
        hint = "" if status else "; continue it with --resume"
        raise UserError(f"{run_dir}: already holds {what}{hint}; choose another --name, or pass --overwrite "
                        f"to replace it")
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not empty and not a run directory (no config.json); --overwrite will not "
                        f"delete it")
    try:
        shutil.rmtree(run_dir)
        run_dir.mkdir()
    except OSError as e:
        raise OutputError(f"{run_dir}: cannot clear for --overwrite ({os_error_text(e)})") from None


def make_run_dir(cfg: RunConfig, overwrite: bool = False) -> Path:
    """runs/<name>, created here. A given cfg.name must not hold another run (refused, or replaced with
    overwrite); the default name "<recipe>-<timestamp>" gets a "-2", "-3", ... suffix when that folder
    exists, and the folder is created exclusively, so two runs started in the same second never share one."""
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.name:
            if cfg.name in (".", "..") or Path(cfg.name).name != cfg.name:
                raise UserError(f"name={cfg.name!r}: a run name is one folder name (no '/', not '.' or '..')")
            run_dir = out / cfg.name
            run_dir.mkdir(exist_ok=True)
            if any(run_dir.iterdir()):
                refuse_or_clear_run_dir(run_dir, overwrite)
            return run_dir
        base = f"{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 10_000):
            run_dir = out / (base if n == 1 else f"{base}-{n}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as e:
        raise OutputError(f"{e.filename or out}: cannot create the run directory ({os_error_text(e)})") from None
    raise UserError(f"{out}: no free run name {base}-N")


def git_fingerprint(repo_dir) -> dict:
    """{"sha", "dirty"} of the git checkout holding repo_dir; nulls when it is not one or git is missing."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def shard_fingerprints(files) -> list[dict]:
    """name, token count and sha256 of each shard file."""
    from pgolf.data.shards import shard_token_count

    return [{"name": Path(p).name, "tokens": shard_token_count(p), "sha256": file_sha256(p)} for p in files]


def env_fingerprint(train_files=(), val_files=(), tokenizer_path=None) -> dict:
    """Versions, hardware, git state of the pgolf checkout, shard and tokenizer hashes."""
    cuda = torch.cuda.is_available()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "git": git_fingerprint(Path(__file__).resolve().parent),
        "train_shards": shard_fingerprints(train_files),
        "val_shards": shard_fingerprints(val_files),
        "tokenizer": None,
    }
    if tokenizer_path:
        env["tokenizer"] = {"name": Path(tokenizer_path).name, "sha256": file_sha256(tokenizer_path)}
    return env


def write_run_header(run_dir, cfg: RunConfig, env: dict) -> None:
    write_json_atomic(Path(run_dir) / "config.json", config_to_dict(cfg))
    write_json_atomic(Path(run_dir) / "env.json", env)


def write_record(run_dir, record) -> Path:
    """Write RUN_DIR/record.json atomically (pgolf.runrecord.record_file_text: a dict is checked against the
    schema first); returns its path. The one writer of run records."""
    path = Path(run_dir) / RECORD_FILE_NAME
    atomic_write_text(path, record_file_text(record))
    return path


class MetricsWriter:
    """Appends one JSON object a line to metrics.jsonl, flushed each line; a no-op when not enabled.

    A line that cannot be written (disk full) does not stop the run: one warning, then the file is closed
    and `error` says why (the run record keeps it)."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.error = None
        try:
            self._f = open(self.path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({os_error_text(e)})") from None
        self.sinks = []  # extra callables(line: dict), e.g. TensorBoard / W&B

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, **fields}
        if self._f is not None:
            try:
                self._f.write(json.dumps(line, default=float) + "\n")
                self._f.flush()
            except OSError as e:
                self.error = f"{self.path}: cannot write ({os_error_text(e)}); later lines are not in the file"
                print(f"pgolf: warning: {self.error}", file=sys.stderr)
                self.close()
        for sink in self.sinks:
            sink(line)

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
