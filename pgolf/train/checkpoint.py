"""Training checkpoints in pgolf's tensor file (no pickle): everything a run needs to continue exactly.

A checkpoint is a folder run_dir/checkpoint/step_<step:07d>/ with one file per rank, rank_<r>.pgw (the
optimizer and the loader may be sharded across ranks, so each rank keeps its own), and a `complete` marker
that rank 0 writes once every rank's file is in place. Each file is written to a temporary name, fsynced and
renamed (pgolf.fileio), and carries checksums (pgolf.tensorfile): a damaged checkpoint is refused, naming it.

Nested state (optimizer state dicts, loader state) is flattened: tensor leaves go into the tensor file under
a path name, everything else stays in the JSON meta as a skeleton that points at those names.
"""

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import UserError
from pgolf.fileio import atomic_write_text
from pgolf.tensorfile import read_tensors, write_tensors

CHECKPOINT_DIRNAME = "checkpoint"
CHECKPOINT_MARKER = "complete"


def flatten_state(obj, prefix: str, tensors: dict):
    """A JSON skeleton of obj; tensors (and numpy arrays) are stored in `tensors` under prefix-based names."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        wide = obj.astype(np.int64) if obj.dtype.kind == "u" else obj  # the tensor file has no uint32/64
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"__ndarray__": prefix, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten_state(v, f"{prefix}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise UserError(f"checkpoint: cannot store a value of type {type(obj).__name__} at {prefix!r}")


def unflatten_state(skel, tensors: dict):
    """Inverse of flatten_state."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__ndarray__" in skel:
            return tensors[skel["__ndarray__"]].numpy().astype(np.dtype(skel["dtype"]))
        if "__dict__" in skel:
            return {k: unflatten_state(v, tensors) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            return [unflatten_state(v, tensors) for v in skel["__list__"]]
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
    return skel


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIRNAME / f"step_{step:07d}"


def save_checkpoint(run_dir, step: int, rank: int, model, opt_state: dict, loader_state: dict,
                    averagers: dict[str, torch.Tensor], scalars: dict) -> Path:
    """Write this rank's file of the step's checkpoint; returns the folder. Rank 0 marks it complete later."""
    folder = checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().cpu() for k, v in averagers.items()})
    meta = {
        "step": int(step),
        "rank": int(rank),
        "scalars": scalars,
        "optimizer": flatten_state(opt_state, "opt", tensors),
        "loader": flatten_state(loader_state, "loader", tensors),
        "rng": flatten_state(rng_state(), "rng", tensors),
    }
    write_tensors(folder / f"rank_{rank}.pgw", tensors, meta)
    return folder


def mark_checkpoint_complete(folder, world_size: int, keep_last: int = 2) -> None:
    """Rank 0, after a barrier: check every rank's file, write the marker, drop older checkpoints."""
    folder = Path(folder)
    missing = [r for r in range(world_size) if not (folder / f"rank_{r}.pgw").is_file()]
    if missing:
        raise UserError(f"{folder}: checkpoint files of ranks {missing} are missing")
    atomic_write_text(folder / CHECKPOINT_MARKER, f"{world_size}\n")
    complete = list_checkpoints(folder.parent.parent)
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / CHECKPOINT_MARKER).is_file())


def find_latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(folder, rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta with optimizer/loader/rng unflattened) of this rank's file."""
    folder = Path(folder)
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        raise UserError(f"{folder}: not a complete checkpoint (no '{CHECKPOINT_MARKER}' marker)")
    saved_world = int(marker.read_text().strip() or 0)
    if saved_world != world_size:
        raise UserError(f"{folder}: written by {saved_world} ranks, cannot resume with {world_size}")
    tensors, meta = read_tensors(folder / f"rank_{rank}.pgw")
    for key in ("optimizer", "loader", "rng"):
        meta[key] = unflatten_state(meta[key], tensors)
    return tensors, meta


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
