"""The data folder's manifest.json (written by `pgolf data build`) against the tokenizer a command uses.

Shards built with one tokenizer and scored with another of the same vocabulary size load, train and score
without any error, with the wrong bytes per token: every val_bpb is then wrong. `check_data_manifest`
compares the tokenizer's sha256 with the one the manifest recorded and refuses a mismatch. A folder with no
manifest (the challenge's downloaded shards) cannot be checked: the result says so, and the callers print
it once and keep it in their record.
"""

import json
from pathlib import Path

from pgolf.errors import UserError
from pgolf.runlog import file_sha256

DATA_MANIFEST_NAME = "manifest.json"


class DataManifestError(UserError):
    """The shards' manifest disagrees with the tokenizer given, or cannot be read."""


def read_data_manifest(folder) -> dict | None:
    """The manifest.json `pgolf data build` writes in a data folder, or None where there is none."""
    path = Path(folder) / DATA_MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataManifestError(f"{path}: not a JSON object")
    return manifest


def check_data_manifest(data_folder, tokenizer_path) -> dict:
    """{"manifest": path or None, "tokenizer_sha256", "checked": bool, "note": str or None}.

    DataManifestError (one line naming both files and both hashes) when the manifest's tokenizer is not
    this tokenizer; "checked" False with a note when the folder has no manifest."""
    manifest = Path(data_folder) / DATA_MANIFEST_NAME
    content = read_data_manifest(data_folder)
    actual = file_sha256(tokenizer_path)  # cached: the run's fingerprint hashes the same file
    if content is None:
        note = (f"{data_folder} has no {DATA_MANIFEST_NAME}: the tokenizer {tokenizer_path} cannot be checked "
                f"against the shards (shards built by `pgolf data build` carry one)")
        return {"manifest": None, "tokenizer_sha256": actual, "checked": False, "note": note}
    try:
        recorded = content["tokenizer"]["sha256"]
    except (KeyError, TypeError):
        raise DataManifestError(f"{manifest}: no tokenizer.sha256 in it") from None
    if recorded != actual:
        raise DataManifestError(f"tokenizer {tokenizer_path} (sha256 {actual}) is not the one the shards were "
                                f"built with: {manifest} records sha256 {recorded}")
    return {"manifest": str(manifest), "tokenizer_sha256": actual, "checked": True, "note": None}


def manifest_shard_hashes(folder) -> dict[str, str]:
    """{shard name: sha256} that folder's manifest.json records ({} without a manifest)."""
    manifest = read_data_manifest(folder)
    if manifest is None:
        return {}
    try:
        return {f["name"]: f["sha256"] for f in manifest["files"]}
    except (KeyError, TypeError):
        raise DataManifestError(f"{Path(folder) / DATA_MANIFEST_NAME}: no files list in it") from None
