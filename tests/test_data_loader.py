"""TrainTokenStream: determinism, rank-disjoint spans, wrap-around, exact resume; load_val_tokens."""

import numpy as np
import pytest
import torch

from pgolf.data.loader import TrainTokenStream, load_val_tokens
from pgolf.data.shards import FILE_AUDIT, write_shard
from pgolf.errors import UserError


@pytest.fixture
def shards(tmp_path):
    # consecutive integers across three uneven shards, so every token says where it came from
    sizes = [1000, 333, 1500]
    start = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(start, start + n, dtype=np.uint16))
        start += n
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(7, 17, dtype=np.uint16))
    return tmp_path, sum(sizes)


def test_batches_follow_the_stream_and_wrap(shards):
    folder, total = shards
    stream = TrainTokenStream(str(folder / "fineweb_train_*.bin"))
    expected = np.arange(total)
    pos = 0
    for _ in range(20):  # 20 * 129 tokens > total: wraps around
        x, y = stream.next_batch(128, 32, 1)
        assert x.dtype == torch.int64 and x.shape == (4, 32)
        span = expected[(pos + np.arange(129)) % total]
        assert torch.equal(x.flatten(), torch.from_numpy(span[:-1]))
        assert torch.equal(y.flatten(), torch.from_numpy(span[1:]))
        pos += 129


def test_deterministic_and_rank_disjoint(shards):
    folder, _ = shards
    pattern = str(folder / "fineweb_train_*.bin")
    world = 4
    streams = [TrainTokenStream(pattern, r, world) for r in range(world)]
    again = TrainTokenStream(pattern, 2, world)
    for _ in range(5):
        batches = [s.next_batch(256, 16, 2) for s in streams]  # local = 256 / (4*2) = 32 tokens
        assert all(x.shape == (2, 16) for x, _ in batches)
        xa, ya = again.next_batch(256, 16, 2)
        assert torch.equal(xa, batches[2][0]) and torch.equal(ya, batches[2][1])
        xs = [x.flatten() for x, _ in batches]
        # the ranks' inputs tile one contiguous span, each target is its input's next token
        for a, b in zip(xs, xs[1:], strict=False):
            assert int(b[0]) == int(a[-1]) + 1
        for x, y in batches:
            assert torch.equal(y.flatten()[:-1], x.flatten()[1:])
        assert len(set(torch.cat(xs).tolist())) == 4 * 32


def test_global_batch_does_not_depend_on_world_size(shards):
    folder, _ = shards
    pattern = str(folder / "fineweb_train_*.bin")
    one = TrainTokenStream(pattern, 0, 1)
    two = [TrainTokenStream(pattern, r, 2) for r in range(2)]
    for _ in range(6):
        x1, y1 = one.next_batch(128, 16)
        parts = [s.next_batch(128, 16) for s in two]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))


def step_batch(streams, batch_tokens: int, seq_len: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step's global (x, y) from one stream per rank, pieces in the order micro-step, rank."""
    pieces = [s.next_batch(batch_tokens, seq_len, grad_accum) for _ in range(grad_accum) for s in streams]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def test_global_batch_does_not_depend_on_the_split_into_ranks_and_micro_steps(shards):
    folder, total = shards
    pattern = str(folder / "fineweb_train_*.bin")
    splits = [(1, 1), (1, 4), (2, 2), (4, 1)]  # (world_size, grad_accum)
    streams = {split: [TrainTokenStream(pattern, r, split[0]) for r in range(split[0])] for split in splits}
    expected = np.arange(total)
    for step in range(12):  # 12 * 257 tokens > total: wraps around
        batches = {split: step_batch(streams[split], 256, 16, split[1]) for split in splits}
        span = torch.from_numpy(expected[(step * 257 + np.arange(257)) % total])
        for split, (x, y) in batches.items():
            assert torch.equal(x.flatten(), span[:-1]), (step, split)
            assert torch.equal(y.flatten(), span[1:]), (step, split)


def test_state_and_batch_shape_are_fixed_inside_a_step(shards):
    folder, _ = shards
    stream = TrainTokenStream(str(folder / "fineweb_train_*.bin"), 0, 2)
    stream.next_batch(256, 16, 2)
    with pytest.raises(UserError, match="micro-step"):
        stream.state_dict()
    with pytest.raises(UserError, match="in the middle of a step"):
        stream.next_batch(512, 16, 2)
    stream.next_batch(256, 16, 2)
    assert stream.state_dict()["pos"] == 257


def test_resume_equals_uninterrupted(shards):
    folder, _ = shards
    pattern = str(folder / "fineweb_train_*.bin")
    full = TrainTokenStream(pattern, 1, 2)
    ref = [full.next_batch(64, 8, 1) for _ in range(40)]
    first = TrainTokenStream(pattern, 1, 2)
    for _ in range(17):
        first.next_batch(64, 8, 1)
    state = first.state_dict()
    resumed = TrainTokenStream(pattern, 1, 2)
    resumed.load_state_dict(state)
    for x_ref, y_ref in ref[17:]:
        x, y = resumed.next_batch(64, 8, 1)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_bad_batch_shape_and_state(shards):
    folder, _ = shards
    stream = TrainTokenStream(str(folder / "fineweb_train_*.bin"))
    with pytest.raises(UserError, match="not a positive multiple of seq_len"):
        stream.next_batch(100, 32, 1)
    other = TrainTokenStream([folder / "fineweb_train_000000.bin"])
    with pytest.raises(UserError, match="loader state"):
        other.load_state_dict(stream.state_dict())


def test_val_tokens_and_audit(shards):
    folder, _ = shards
    FILE_AUDIT.clear()
    with FILE_AUDIT.phase("eval"):
        val = load_val_tokens(str(folder / "fineweb_val_*.bin"), vocab_size=1024)
    assert val.dtype == torch.int64 and val.tolist() == list(range(7, 17))
    with FILE_AUDIT.phase("train"):
        TrainTokenStream(str(folder / "fineweb_train_*.bin")).next_batch(2048, 64, 1)
    assert all("fineweb_train_" in p for p in FILE_AUDIT.opened("train"))
    assert [p.endswith("fineweb_val_000000.bin") for p in FILE_AUDIT.opened("eval")] == [True]
    with FILE_AUDIT.phase("eval"):
        assert load_val_tokens(str(folder / "fineweb_val_*.bin"), max_tokens=4).tolist() == [7, 8, 9, 10]
        assert load_val_tokens(str(folder / "fineweb_val_*.bin"), max_tokens=99).tolist() == list(range(7, 17))
