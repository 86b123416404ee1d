"""Shared fixtures: paths to ../shared, tiny configs, a seeded RNG."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_1024 = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model"
TOKENIZER_8192 = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model"
WIKI_DIR = SHARED / "data" / "wiki"


def pytest_collection_modifyitems(config, items):
    have_shared = TOKENIZER_1024.exists() and (WIKI_DIR / "docs_000.jsonl.xz").exists()
    skip_shared = pytest.mark.skip(reason="../shared (challenge tokenizers, wiki corpus) is not beside the checkout")
    try:
        import torch

        have_gpu = torch.cuda.is_available()
    except ImportError:
        have_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "shared" in item.keywords and not have_shared:
            item.add_marker(skip_shared)
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_cfg():
    from pgolf.recipes import recipe_tiny

    return recipe_tiny()
