"""The run directory: resolved config, environment fingerprint, metrics stream and the run record.

Layout (docs/architecture.md): runs/<name>/config.json, env.json, metrics.jsonl, checkpoint/, model.pgw,
model.pgq, record.json. Only rank 0 writes; the callers pass `enabled=False` elsewhere.
"""

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from pgolf.config import RunConfig, config_to_dict

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


def write_json_atomic(path, obj) -> None:
    """Write obj as indented JSON to path via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def make_run_dir(cfg: RunConfig) -> Path:
    """runs/<name>, the name being cfg.name or "<recipe>-<timestamp>"; created if missing."""
    name = cfg.name or f"{cfg.recipe or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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


def write_record(run_dir, record: dict) -> Path:
    """Write record.json atomically; returns its path."""
    path = Path(run_dir) / "record.json"
    write_json_atomic(path, record)
    return path


class MetricsWriter:
    """Appends one JSON object a line to metrics.jsonl, flushed each line; a no-op when not enabled."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = open(self.path, "a") if enabled else None
        self.sinks = []  # extra callables(line: dict), e.g. TensorBoard / W&B

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, **fields}
        self._f.write(json.dumps(line, default=float) + "\n")
        self._f.flush()
        for sink in self.sinks:
            sink(line)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
