"""Shared fixtures: paths to ../shared, tiny configs, a seeded RNG."""

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (pgolf.model.fused_qk) run their own source through Triton's interpreter, on
# CPU tensors: set before any pgolf module defines one (the decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_1024 = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
TOKENIZER_8192 = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model"
WIKI_DIR = SHARED / "data" / "wiki"


def pytest_collection_modifyitems(config, items):
    have_shared = TOKENIZER_1024.exists() and (WIKI_DIR / "docs_000.jsonl.xz").exists()
    skip_shared = pytest.mark.skip(reason="../shared (challenge tokenizers, wiki corpus) is not beside the checkout")
    have_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "shared" in item.keywords and not have_shared:
            item.add_marker(skip_shared)
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)


def write_wiki_shards(out: Path, val_tokens: int, total_tokens: int) -> Path:
    """Challenge-format shards of real Wikipedia text in `out`, beside a copy of the sp1024 tokenizer: the
    first val_tokens of the encoded documents (BOS before each) as the val shard, the rest up to at least
    total_tokens as the train shard. Built at test time: no corpus text is kept in the repository."""
    import itertools
    import shutil

    import numpy as np
    import sentencepiece as spm

    from pgolf.data.corpus import iter_documents
    from pgolf.data.shards import write_shard

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_1024))
    shutil.copyfile(TOKENIZER_1024, out / TOKENIZER_1024.name)
    ids: list[int] = []
    for doc in itertools.islice(iter_documents([WIKI_DIR / "docs_000.jsonl.xz"]), 200):
        ids += [sp.bos_id()] + sp.encode(doc)
        if len(ids) > total_tokens:
            break
    tokens = np.array(ids, dtype=np.uint16)
    write_shard(out / "fineweb_val_000000.bin", tokens[:val_tokens])
    write_shard(out / "fineweb_train_000000.bin", tokens[val_tokens:])
    return out


@pytest.fixture
def tiny_cfg():
    from pgolf.recipes import recipe_tiny

    return recipe_tiny()


@pytest.fixture(autouse=True)
def fresh_shared_compiles():
    """Each test starts with no compiled callable kept from an earlier one (pgolf.eval.scoring.shared_compile):
    a test that patches torch.compile gets wrappers made through its patch."""
    from pgolf.eval.scoring import reset_shared_compiles

    reset_shared_compiles()
    yield


@pytest.fixture
def compiled_graphs(monkeypatch):
    """torch.compile through a backend that counts the graphs of each compiled function (by name) and runs
    them as traced (no Inductor: fast on a CPU); Dynamo's caches are emptied before and after."""
    import torch

    counts = Counter()
    real_compile = torch.compile

    def counting_compile(fn, **kw):
        if "backend" in kw:  # torch's own compiles (eager flex_attention's) name their backend: not counted
            return real_compile(fn, **kw)

        def backend(gm, example_inputs):
            counts[fn.__name__] += 1
            return gm.forward
        return real_compile(fn, backend=backend, **kw)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting_compile)
    yield counts
    torch._dynamo.reset()
