"""The exporter: the declared manifest against the package's real imports, the line rules, the generated
train_gpt.py, the submission folder, and the key check that the exported script trains bit for bit like the
package."""

import argparse
import ast
import dataclasses
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.config import apply_overrides
from pgolf.errors import UserError
from pgolf.export.amalgamate import (
    AmalgamationError,
    amalgamate,
    check_unique_names,
    export_script,
    module_file,
    transform_text,
    wrap_compressed,
)
from pgolf.export.manifest import OUTSIDE_SCRIPT, SCRIPT_MODULES, module_manifest, script_packages
from pgolf.recipes import RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_1024 = REPO.parent / "shared" / "data" / "tokenizers" / "fineweb_1024_bpe.model"
WIKI_DOCS = REPO.parent / "shared" / "data" / "wiki" / "docs_000.jsonl.xz"
PYTHON = sys.executable
ALLOWED_ROOTS = {"torch", "numpy", "sentencepiece", "zstandard", "brotli"}
SCRIPT_ROOTS = ("pgolf.train.loop", "pgolf.export.script_entry")  # where the script's run path starts


def all_package_modules() -> list[str]:
    names = []
    for path in sorted((REPO / "pgolf").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def package_imports(name: str) -> list[tuple[str, bool]]:
    """(module, at module level) of every `from pgolf.x import` of a package module, read with ast (the test's
    independent view; the exporter itself only tokenizes)."""
    tree = ast.parse(module_file(name).read_text())
    top = set(tree.body)
    return [(node.module, node in top) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgolf")]


def bound_names(stmt) -> list[tuple[str, str]]:
    """(name, binding) of the top-level names stmt binds, also inside top-level try / if blocks."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [(stmt.name, "def")]
    if isinstance(stmt, ast.Import):
        return [(a.asname or a.name.split(".")[0], f"import {a.name if a.asname else a.name.split('.')[0]}")
                for a in stmt.names]  # `import a.b` binds a
    if isinstance(stmt, ast.ImportFrom):
        return [(a.asname or a.name, f"from {stmt.module} import {a.name}") for a in stmt.names]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [(n.id, "def") for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return [b for f in ("body", "orelse", "finalbody", "handlers") for child in getattr(stmt, f, []) or []
            for b in bound_names(child)]


def text(source: str, placed=None, left_out=None, codec="zstd", docstrings=True, comments=True, name="pgolf.m"):
    placed = {"pgolf.errors": 0, "pgolf.m": 1, "pgolf.later": 2} if placed is None else placed
    return transform_text(name, Path(name.replace(".", "/") + ".py"), source, placed, left_out or {}, codec,
                          docstrings, comments)


# ---- (a) the declared manifest matches the package

IMPORT_PROBE = r"""
import contextlib, io, json, os, sys, threading, traceback, importlib
report = {}
before_files = set(os.listdir("."))
for name in sys.argv[1:]:
    threads = threading.active_count()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(name)
        problem = None
    except Exception:
        problem = traceback.format_exc(limit=2).strip().splitlines()[-1]
    new_threads = threading.active_count() - threads
    report[name] = {"error": problem, "printed": out.getvalue() + err.getvalue(), "threads": new_threads}
report["__files__"] = sorted(set(os.listdir(".")) - before_files)
print(json.dumps(report))
"""


def test_every_module_imports_without_side_effects(tmp_path):
    """Importing each pgolf module does not fail, print, start threads, or write files."""
    modules = all_package_modules()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.run([PYTHON, "-c", IMPORT_PROBE, *modules], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("__files__") == []
    assert sorted(os.listdir(home)) == []
    problems = {name: r for name, r in report.items() if r["error"] or r["printed"] or r["threads"] > 0}
    assert problems == {}


def test_manifest_is_the_run_path_in_dependency_order():
    """SCRIPT_MODULES holds exactly the modules the run path imports (ast closure from train_run and the
    script entry, the exporter aside), each after every module it imports at module level."""
    declared = [row.name for row in SCRIPT_MODULES]
    assert len(declared) == len(set(declared))
    reached, todo = set(), list(SCRIPT_ROOTS)
    while todo:
        name = todo.pop()
        if name in reached or name in OUTSIDE_SCRIPT:
            continue
        reached.add(name)
        todo += [dep for dep, _ in package_imports(name)]
    assert sorted(reached) == sorted(declared)
    for name in declared:
        for dep, top in package_imports(name):
            if top:
                assert declared.index(dep) < declared.index(name), (dep, name)
    conditional = {row.name for row in SCRIPT_MODULES if row.when is not None}
    always = [name for name in declared if name not in conditional]
    for name in always:  # an always-present module may import a conditional one only inside a function
        assert not [dep for dep, top in package_imports(name) if top and dep in conditional], name


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_manifest_of_each_recipe(recipe):
    names, left_out = module_manifest(get_recipe(recipe))
    assert names[0] == "pgolf.errors" and names[-1] == "pgolf.export.script_entry"
    assert not any(n.startswith(("pgolf.experiments", "pgolf.cli")) for n in names)
    assert left_out["pgolf.export.amalgamate"] == "never" and not set(names) & set(left_out)


def test_every_conditional_module_can_be_left_out():
    cfg = apply_overrides(get_recipe("tiny"), ["train.doc_mask=false", "eval.sliding_stride=0", "eval.ttt=false",
                                               "eval.precompile=false", "quant.enabled=false", "quant.fit_k=false"])
    source, info = amalgamate(cfg)
    conditional = {row.name for row in SCRIPT_MODULES if row.when is not None}
    assert conditional <= set(info["left_out"]) and not conditional & set(info["modules"])
    full = apply_overrides(get_recipe("frontier"), ["eval.precompile=true", "eval.ttt_doc_context=cache"])
    assert conditional <= set(amalgamate(full)[1]["modules"])
    assert len(source) < len(amalgamate(full)[0])


def test_top_level_names_are_unique_across_the_whole_package():
    owner, clashes = {}, []
    for name in all_package_modules():
        for stmt in ast.parse(module_file(name).read_text()).body:
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("pgolf"):
                continue
            for bound, binding in bound_names(stmt):
                prev = owner.setdefault(bound, (name, binding))
                if prev[0] != name and (binding == "def" or binding != prev[1]):
                    clashes.append((bound, prev[0], name))
    assert clashes == []


def test_the_exporter_reads_no_code():
    """Item 5 of issue 22: the exporter decides nothing by parsing or running package code."""
    for path in (REPO / "pgolf" / "export").glob("*.py"):
        source = path.read_text()
        for word in ("import ast", "eval(", "exec(", "find_spec", "import_module", "inspect"):
            assert word not in source, (path.name, word)


# ---- the line rules

def test_package_imports_go_and_their_rules_hold():
    src = ("import math\nfrom pgolf.errors import UserError\nfrom pgolf.errors import (\n    UserError,\n)\n\n\n"
           "def run():\n    from pgolf.later import thing\n    from pgolf.gone import other\n    return math.pi\n")
    mod = text(src, left_out={"pgolf.gone": "cfg.x"})
    assert mod.body == "def run():\n    return math.pi\n"
    assert mod.hoisted == [("import", "math", None)] and mod.defined == [("run", "pgolf/m.py:8")]
    bad = {"from .x import y\n": "must be `from pgolf.x import name`",
           "import pgolf.config\n": "must be `from pgolf.x import name`",
           "from pgolf.errors import UserError as E\n": "unaliased",
           "from pgolf.later import thing\n": "must come before it in SCRIPT_MODULES",
           "from pgolf.gone import other\n": "in only when cfg.x",
           "def f():\n    from pgolf.elsewhere import x\n": "not in SCRIPT_MODULES",
           "import os; from pgolf.errors import UserError\n": "own line",
           "if __name__ == '__main__':\n    pass\n": "__name__"}
    for source, message in bad.items():
        with pytest.raises(AmalgamationError, match=message):
            text(source, left_out={"pgolf.gone": "cfg.x"})


def test_docstrings_comments_and_strings():
    src = ('"""Module doc.\nfrom pgolf.errors import UserError\n"""\n\nimport math  # hoisted\n\n\n'
           'class Oops(Exception):\n    """Only a docstring."""\n\n\n'
           'def f(x):\n    """Doc."""\n    # a comment line\n    s = """\nfrom pgolf.errors import UserError\n\n'
           '# in a string\n"""\n    return x + "a # not a comment"  # comment\n')
    body = text(src).body
    assert body == ('class Oops(Exception):\n    pass\ndef f(x):\n    s = """\nfrom pgolf.errors import UserError\n\n'
                    '# in a string\n"""\n    return x + "a # not a comment"\n')
    kept = text(src, docstrings=False, comments=False).body
    assert kept.startswith('"""Module doc.\nfrom pgolf.errors import UserError\n"""\n\n\n\nclass Oops')
    assert '    """Doc."""\n    # a comment line\n' in kept and "# comment\n" in kept
    ast.parse(body), ast.parse(kept)


def test_third_party_policy():
    ok = ("import numpy as np\nimport json\n\ndef f():\n    import zstandard\n"
          "    try:\n        import wandb\n    except ImportError:\n        pass\n")
    assert text(ok, codec="zlib").hoisted == [("import", "numpy", "np"), ("import", "json", None)]
    assert script_packages("zlib") == {"required": ["numpy", "sentencepiece", "torch"],
                                       "optional": ["brotli", "flash_attn_interface", "triton", "wandb", "zstandard"]}
    assert script_packages("zstd")["required"] == ["numpy", "sentencepiece", "torch", "zstandard"]
    for src in ("import requests\n", "def f():\n    import scipy\n", "import brotli\n", "from brotli import x\n"):
        with pytest.raises(AmalgamationError, match="may not import"):
            text(src, codec="zstd")


def test_clash_detection_names_both_modules():
    a = text("import torch\nfrom torch import nn\nLIMIT = 3\ndef helper():\n    pass\n", name="pgolf.a")
    b = text("import torch\nfrom torch import nn\ndef helper():\n    return 1\n", name="pgolf.b")
    check_unique_names([a, text("import torch\nfrom torch import nn\nx: int = 1\n", name="pgolf.c")])
    with pytest.raises(AmalgamationError, match=r"'helper' in pgolf/a.py:4 and pgolf/b.py:3"):
        check_unique_names([a, b])
    with pytest.raises(AmalgamationError, match="'nn'"):
        check_unique_names([a, text("from numpy import random as nn\n", name="pgolf.c")])
    with pytest.raises(AmalgamationError, match="'LIMIT'"):
        check_unique_names([a, text("LIMIT, OTHER = 1, 2\n", name="pgolf.c")])


# ---- (b) the generated script

@pytest.fixture(scope="module")
def tiny_script():
    return amalgamate(get_recipe("tiny"))


def test_generated_script_parses_and_imports_only_allowed_packages(tiny_script):
    source, info = tiny_script
    tree = ast.parse(source)
    guarded = set()  # imports inside `try: ... except ImportError` are optional
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any("ImportError" in ast.unparse(h.type) for h in node.handlers if h.type):
            guarded.update(n for stmt in node.body for n in ast.walk(stmt))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in guarded:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            roots.update(n.split(".")[0] for n in names)
    assert "pgolf" not in roots and "pgolf" not in source.split("import")
    assert roots - set(sys.stdlib_module_names) <= ALLOWED_ROOTS
    assert "pgolf.eval.ttt" in info["modules"]
    doc_lora = "cfg.eval.ttt and cfg.eval.ttt_mode == 'doc_lora'"
    assert info["left_out"] == {"pgolf.export.amalgamate": "never", "pgolf.eval.doc_lora": doc_lora,
                                "pgolf.eval.ttt_doc": doc_lora, "pgolf.model.doc_attention":
                                    "cfg.train.doc_mask or cfg.eval.doc_isolated or cfg.eval.ttt_mode == 'doc_lora'",
                                "pgolf.model.kv_cache": doc_lora + " and cfg.eval.ttt_doc_context == 'cache'"}
    assert source.rstrip().endswith("sys.exit(script_main(Hyperparameters, __file__))")
    wrapped = wrap_compressed(source)
    assert len(wrapped) < len(source) and wrapped.count("\n") == 2
    blob = ast.literal_eval(wrapped.split("b85decode(", 1)[1].split("),format", 1)[0])
    import base64

    decoded = lzma.decompress(base64.b85decode(blob), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    assert decoded.decode() == source


def test_compressed_form_keeps_the_source_readable(tmp_path):
    """triton.jit reads its kernels' source with inspect: the wrapped script registers the plain text."""
    (tmp_path / "w.py").write_text(wrap_compressed("import inspect\n\n\ndef f():\n    return 1\n\n\n"
                                                   "print(inspect.getsource(f), end='')\n"))
    out = subprocess.run([PYTHON, "w.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "def f():\n    return 1\n", out.stderr


def script_namespace(source: str) -> dict:
    namespace = {"__name__": "train_gpt_under_test", "__file__": "train_gpt.py"}
    exec(compile(source, "train_gpt.py", "exec"), namespace)
    return namespace


def test_hyperparameters_read_env_with_recipe_defaults(tiny_script):
    ns = script_namespace(tiny_script[0])
    hp_cls = ns["Hyperparameters"]
    names = [f[0] for f in hp_cls.FIELDS]
    assert len(names) == len(set(names))
    for conventional in ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "VOCAB_SIZE",
                         "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "MAX_WALLCLOCK_SECONDS", "WARMDOWN_ITERS",
                         "MATRIX_LR", "SCALAR_LR", "TIED_EMBED_LR", "MUON_MOMENTUM", "SEED", "DATA_PATH",
                         "TOKENIZER_PATH", "ITERATIONS", "QUANT_MATRIX_BITS", "XSA_LAST_N"):
        assert conventional in names, conventional
    default_cfg = hp_cls(environ={}).run_config()
    assert dataclasses.asdict(default_cfg) == dataclasses.asdict(get_recipe("tiny"))
    hp = hp_cls(environ={"NUM_LAYERS": "3", "MATRIX_LR": "0.01", "TIE_EMBEDDINGS": "0", "MODEL_NUM_LAYRS": "2",
                         "PATH": "/bin"})
    cfg = hp.run_config()
    assert (cfg.model.num_layers, cfg.optim.matrix_lr, cfg.model.tie_embeddings) == (3, 0.01, False)
    assert hp.unknown == ["MODEL_NUM_LAYRS"]
    with pytest.raises(ns["ConfigError"], match="NUM_HEADS"):
        hp_cls(environ={"NUM_HEADS": "eight"})


def test_script_refuses_a_feature_it_was_generated_without():
    source, info = amalgamate(get_recipe("baseline"))
    assert "pgolf.eval.ttt" in info["left_out"] and "pgolf.eval.ttt" not in info["modules"]
    ns = script_namespace(source)
    hp_cls = ns["Hyperparameters"]
    hp_cls(environ={}).run_config()
    with pytest.raises(ns["ConfigError"], match="pgolf.eval.ttt"):
        hp_cls(environ={"TTT_ENABLED": "1"}).run_config()


def test_export_command_bakes_in_the_proxy_then_the_overrides(tmp_path):
    from pgolf.cli import main as pgolf_main
    from pgolf.recipes import apply_proxy

    path = tmp_path / "train_gpt.py"
    assert pgolf_main(["export", "--recipe", "record", "--proxy", "300", "--set", "train.warmdown_iters=900",
                       "--form", "plain", "--out", str(path)]) == 0
    baked = script_namespace(path.read_text())["Hyperparameters"](environ={}).run_config()
    expected = apply_overrides(apply_proxy(get_recipe("record"), seconds=300), ["train.warmdown_iters=900"])
    assert dataclasses.asdict(baked) == dataclasses.asdict(expected)
    assert (baked.train.wallclock_s, baked.train.batch_tokens) == (300, get_recipe("record").train.batch_tokens // 8)


def test_export_script_writes_the_smaller_form(tmp_path):
    cfg = get_recipe("tiny")
    auto = export_script(cfg, tmp_path / "a.py")
    assert auto["form"] == "compressed" and auto["bytes"] == auto["compressed_bytes"] < auto["plain_bytes"]
    plain = export_script(cfg, tmp_path / "p.py", compressed=False)
    assert plain["bytes"] == plain["plain_bytes"] == (tmp_path / "p.py").stat().st_size
    assert plain["plain_bytes"] == auto["plain_bytes"]
    assert export_script(cfg, tmp_path / "d.py", compressed=False, strip_docstrings=False)["bytes"] > plain["bytes"]
    assert export_script(cfg, tmp_path / "c.py", compressed=False, strip_comments=False)["bytes"] > plain["bytes"]


# ---- the submission folder (from run records of the real schema)

def fake_finished_run(run_dir: Path, cfg, seed: int, bpb: float, artifact: int) -> Path:
    from pgolf.runlog import write_record
    from pgolf.train.finish import new_record

    run_dir.mkdir(parents=True)
    cfg = apply_overrides(cfg, [f"train.seed={seed}"])
    env = {"torch": "2.9.1+cu128", "cuda": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 8}
    record = new_record(cfg, env, run_dir)
    record["status"] = "ok"
    record["metrics"].update(prequant_loss=2 * bpb, prequant_bpb=bpb, roundtrip_loss=2 * bpb + 0.01,
                             roundtrip_bpb=bpb + 0.005)
    record["train"].update(steps=7000, ms_per_step=85.0)
    record["bytes"]["artifact"] = artifact
    record["compliance"].update(train_plus_calibration_s=598.0, eval_s=120.0)
    write_record(run_dir, record)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 6.9}\n')
    return run_dir


def test_export_command_writes_a_submission_folder(tmp_path):
    from pgolf.export.commands import add_export_commands

    cfg = get_recipe("baseline")
    runs = [fake_finished_run(tmp_path / f"r{s}", cfg, s, bpb, art)
            for s, bpb, art in ((1, 1.22, 15_800_000), (2, 1.23, 15_810_000), (3, 1.21, 15_790_000))]
    base = [fake_finished_run(tmp_path / "base" / f"b{s}", cfg, s, bpb, 15_000_000)
            for s, bpb in ((1, 1.40), (2, 1.41), (3, 1.39))]
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers())
    out = tmp_path / "records" / "2026-05-01_Baseline"
    args = parser.parse_args(["export", "--recipe", "baseline", "--out", str(out), "--runs", *map(str, runs),
                              "--author", "me", "--name", "Baseline again", "--baseline-runs", *map(str, base)])
    assert args.func(args) == 0
    sub = json.loads((out / "submission.json").read_text())
    code = (out / "train_gpt.py").stat().st_size
    assert sub["bytes_code"] == code and sub["bytes_total"] == code + 15_810_000
    assert sub["seeds"] == [1, 2, 3] and sub["score_stage"] == "roundtrip"
    assert sub["val_bpb"] == pytest.approx((1.225 + 1.235 + 1.215) / 3)
    assert sub["val_bpb_std"] == pytest.approx(0.01)
    assert sub["seed_results"]["2"] == pytest.approx({"val_loss": 2.47, "val_bpb": 1.235,
                                                      "artifact_bytes": 15_810_000, "steps": 7000,
                                                      "step_avg_ms": 85.0})
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.9.1+cu128"
    assert sub["compliance"]["train_under_600s"] and sub["compliance"]["three_seeds"]
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss"):
        assert key in sub
    comp = sub["comparison"]
    assert comp["delta_nats"] == pytest.approx(2 * 1.22 - 2 * 1.40)
    assert comp["passes"] and comp["p_value"] < 0.01 and comp["same_tokenizer"]
    assert "torch==2.9.1" in (out / "requirements.txt").read_text().split()
    readme = (out / "README.md").read_text()
    assert "| 2 | 2.47000 | 1.23500 | 15810000 | 7000 | 85.0 |" in readme and "95% CI" in readme
    assert "passes the challenge rule" in readme
    assert (out / "logs" / "seed3_r3" / "metrics.jsonl").is_file()


def test_submission_refuses_runs_of_another_config(tmp_path):
    from pgolf.export.submission import load_runs, write_submission

    run = fake_finished_run(tmp_path / "r1", get_recipe("baseline"), 1, 1.22, 15_800_000)
    cfg = apply_overrides(get_recipe("baseline"), ["model.num_layers=10"])
    with pytest.raises(UserError, match="model.num_layers"):
        write_submission(cfg, tmp_path / "out", load_runs([run]))


# ---- (c) the exported script trains exactly like the package

def build_tiny_shards(folder: Path) -> Path:
    from pgolf.data.build import build_split_shards

    docs = folder / "docs.jsonl"
    with lzma.open(WIKI_DOCS, "rt") as f, open(docs, "w") as out:
        for _, line in zip(range(24), f, strict=False):
            out.write(json.dumps({"text": json.loads(line)["text"][:1500]}) + "\n")
    build_split_shards([docs], TOKENIZER_1024, val_docs=4, out_dir=folder / "data", workers=1, progress=False)
    return folder / "data"


TEST_OVERRIDES = {"train.max_steps": ("ITERATIONS", "3"), "train.log_every": ("TRAIN_LOG_EVERY", "1"),
                  "train.batch_tokens": ("TRAIN_BATCH_TOKENS", "2048"),
                  "quant.calib_batches": ("QUANT_CALIB_BATCHES", "2"), "quant.codec": ("QUANT_CODEC", "zlib")}

PACKAGE_RUN = """
import sys
from pgolf.config import apply_overrides
from pgolf.recipes import get_recipe
from pgolf.train.loop import train_run
record = train_run(apply_overrides(get_recipe("tiny"), sys.argv[1:]))
sys.exit(0 if record["status"] == "ok" else 1)
"""


def run_files(run_dir: Path) -> tuple[list[float], str, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    artifact = hashlib.sha256((run_dir / "model.pgq").read_bytes()).hexdigest()
    return losses, artifact, json.loads((run_dir / "record.json").read_text())


@pytest.mark.shared
def test_exported_script_reproduces_the_package_bit_for_bit(tmp_path):
    data = build_tiny_shards(tmp_path)
    script = tmp_path / "sub" / "train_gpt.py"
    info = export_script(get_recipe("tiny"), script)
    assert info["form"] == "compressed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    overrides = [f"{k}={v}" for k, (_, v) in TEST_OVERRIDES.items()]
    pkg = subprocess.Popen([PYTHON, "-c", PACKAGE_RUN, f"data.path={data}", f"out_dir={tmp_path / 'runs'}",
                            "name=package", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    script_env = {**env, "DATA_PATH": str(data), "OUT_DIR": str(tmp_path / "runs"), "RUN_ID": "script",
                  **dict(TEST_OVERRIDES.values())}
    poison = tmp_path / "poison" / "pgolf"  # an import of pgolf by the script would fail loudly
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('train_gpt.py must not import pgolf')\n")
    script_env["PYTHONPATH"] = str(poison.parent)
    scr = subprocess.run([PYTHON, script.name], cwd=script.parent, env=script_env, capture_output=True,
                         text=True, timeout=300)
    pkg_out = pkg.communicate(timeout=300)[0]
    assert pkg.returncode == 0, pkg_out[-3000:]
    assert scr.returncode == 0, (scr.stdout + scr.stderr)[-3000:]
    pkg_losses, pkg_artifact, pkg_record = run_files(tmp_path / "runs" / "package")
    scr_losses, scr_artifact, scr_record = run_files(tmp_path / "runs" / "script")
    assert len(pkg_losses) == 3
    assert scr_losses == pkg_losses
    assert scr_artifact == pkg_artifact
    assert scr_record["metrics"] == pkg_record["metrics"]
    assert scr_record["bytes"]["code"] == script.stat().st_size
