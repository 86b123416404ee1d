import pytest
import torch

from pgolf.errors import UserError
from pgolf.tensorfile import read_tensors, write_tensors


def test_roundtrip_all_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "h": torch.randn(4, generator=g).half(),
        "b": torch.randn(2, 2, generator=g).bfloat16(),
        "q": torch.randint(-31, 32, (7,), generator=g, dtype=torch.int8),
        "i": torch.arange(5),
        "m": torch.tensor([True, False]),
    }
    write_tensors(tmp_path / "t.pgw", tensors, {"step": 3})
    back, meta = read_tensors(tmp_path / "t.pgw")
    assert meta == {"step": 3}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_damaged_files_are_refused(tmp_path):
    p = tmp_path / "t.pgw"
    write_tensors(p, {"w": torch.ones(100)})
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated"):
        read_tensors(p)
    p.write_bytes(b"garbage" + data)
    with pytest.raises(UserError, match="bad magic"):
        read_tensors(p)
