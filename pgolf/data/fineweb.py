"""Download the challenge's published FineWeb shards and tokenizers from the Hugging Face hub.

The dataset repo (`willdepueoai/parameter-golf`, type dataset) holds, under its root folder `datasets/`:
`manifest.json`, `datasets/<dataset>/fineweb_{val,train}_NNNNNN.bin` and `tokenizers/<files>`. The manifest
lists datasets (`name`, `tokenizer_name`, `stats.files_train`, `stats.files_val`) and tokenizers (`name`
and the repo-relative `model_path` / `vocab_path` / `path` of their files). We fetch the manifest, then
the variant's val shards, its first N train shards and its tokenizer files, into
OUT/manifest.json, OUT/datasets/<dataset>/ and OUT/tokenizers/. A file already present and verified is
skipped, so an interrupted download resumes; each shard's header and size are checked after download.
The variants are the plain sp1024 / sp8192 ones: CaseOps shards and their val byte sidecar are built from
the documents (JSONL) with `pgolf data build --caseops` (pgolf.data.build).
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pgolf.data.shards import ShardError, shard_header
from pgolf.errors import UserError

FINEWEB_REPO_ID = "willdepueoai/parameter-golf"
FINEWEB_REMOTE_ROOT = "datasets"
FINEWEB_VARIANTS = {"sp1024": "fineweb10B_sp1024", "sp8192": "fineweb10B_sp8192"}

# fetch(remote_path, destination): puts the repo file `remote_path` at `destination` or raises.
Fetcher = Callable[[str, Path], None]


def hub_fetch(remote_path: str, destination: Path) -> None:
    """Fetch one file of the dataset repo with huggingface_hub and copy it to `destination` atomically."""
    from huggingface_hub import hf_hub_download

    remote = PurePosixPath(remote_path)
    try:
        cached = hf_hub_download(repo_id=FINEWEB_REPO_ID, filename=remote.name, repo_type="dataset",
                                 subfolder=str(remote.parent) if str(remote.parent) != "." else None)
    except Exception as e:  # network, offline mode, missing file: all end the command with one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot download {remote_path} from the Hugging Face hub ({FINEWEB_REPO_ID}): "
                        f"{type(e).__name__}: {first} -- check the network connection") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.part")
    shutil.copyfile(Path(cached).resolve(), tmp)
    os.replace(tmp, destination)


def check_hub_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast with one line when the hub's host cannot be reached (instead of minutes of retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return  # offline mode: huggingface_hub answers from its cache, or says it cannot
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub at {host}:{port} ({e.strerror or e}); "
                        f"no network? Build shards locally with `pgolf data build` instead") from None


def find_dataset_entry(manifest: dict, variant: str) -> tuple[dict, dict]:
    """(dataset entry, tokenizer entry) of a variant in the manifest, or UserError."""
    if variant not in FINEWEB_VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of {sorted(FINEWEB_VARIANTS)}")
    name = FINEWEB_VARIANTS[variant]
    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if dataset is None:
        raise UserError(f"dataset {name} is not in the hub manifest")
    tok_name = dataset.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tokenizer is None:
        raise UserError(f"tokenizer {tok_name!r} of dataset {name} is not in the hub manifest")
    return dataset, tokenizer


def plan_fineweb_files(manifest: dict, variant: str, train_shards: int) -> list[tuple[str, str, str]]:
    """(kind, repo path under the root folder, local path under OUT) for every file to fetch, in order."""
    dataset, tokenizer = find_dataset_entry(manifest, variant)
    stats = dataset.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise UserError(f"--train-shards {train_shards}: {variant} has {n_train} training shards on the hub")
    folder = f"datasets/{dataset['name']}"
    plan = [("shard", f"{folder}/fineweb_val_{i:06d}.bin", f"{folder}/fineweb_val_{i:06d}.bin")
            for i in range(n_val)]
    plan += [("shard", f"{folder}/fineweb_train_{i:06d}.bin", f"{folder}/fineweb_train_{i:06d}.bin")
             for i in range(train_shards)]
    paths = [str(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    if not paths:
        raise UserError(f"tokenizer {tokenizer.get('name')!r} in the hub manifest lists no files")
    plan += [("tokenizer", p, f"tokenizers/{PurePosixPath(p).name}") for p in paths]
    return plan


def is_complete(kind: str, path: Path) -> bool:
    """A file already there that needs no download: a shard whose header and size check out, or any non-empty file."""
    if not path.is_file():
        return False
    if kind != "shard":
        return path.stat().st_size > 0
    try:
        shard_header(path)
    except ShardError:
        return False
    return True


def load_hub_manifest(out_dir: Path, fetch: Fetcher) -> dict:
    path = out_dir / "manifest.json"
    if not path.is_file():
        fetch(f"{FINEWEB_REMOTE_ROOT}/manifest.json", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        path.unlink()
        raise UserError(f"{path}: the hub manifest is not valid JSON ({e}); removed, run again") from None


def download_fineweb(variant: str, train_shards: int, out_dir, fetch: Fetcher | None = None,
                     log: Callable[[str], None] = print) -> list[Path]:
    """Fetch (or resume) a variant's val shards, first `train_shards` train shards and tokenizer; return paths."""
    if fetch is None:
        check_hub_reachable()
        fetch = hub_fetch
    out_dir = Path(out_dir)
    manifest = load_hub_manifest(out_dir, fetch)
    done = []
    for kind, remote, local in plan_fineweb_files(manifest, variant, train_shards):
        path = out_dir / local
        if is_complete(kind, path):
            log(f"ok      {local}")
        else:
            fetch(f"{FINEWEB_REMOTE_ROOT}/{remote}", path)
            if kind == "shard":
                try:
                    shard_header(path)
                except ShardError:
                    path.unlink()
                    raise
            log(f"fetched {local}")
        done.append(path)
    return done
