"""Generate the single-file `train_gpt.py` of a recipe from the package's own modules.

The script is a build artifact: the modules the recipe's run path uses (`module_manifest`), each with its
`from pgolf... import ...` statements removed (the names resolve because top-level names are unique across
the package; `check_unique_names` verifies that and names any clash), docstrings and comments optionally
stripped, and the third-party imports hoisted to the top and de-duplicated. Only stdlib, torch, numpy,
sentencepiece and the recipe's codec library may be imported (a function-local import of a codec library is
allowed: codecs are chosen at run time; an import guarded by `except ImportError` is optional). At the end
comes a generated `Hyperparameters` section (pgolf/export/hyperparams.py) and a `main()` that calls
`train_run`, so the file runs like the challenge's: `torchrun --standalone --nproc_per_node=N train_gpt.py`
or `python train_gpt.py`.
"""

import ast
import io
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.config import RunConfig, config_hash, validate_config
from pgolf.errors import UserError
from pgolf.export.hyperparams import hyperparameters_section
from pgolf.fileio import atomic_write_text
from pgolf.quant.size import wrap_script

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Where the run path starts: the config tree and the training entry point.
MANIFEST_ROOTS = ("pgolf.config", "pgolf.train.loop")
# Modules reached only through a function-local import, with the config condition (a Python expression on
# `cfg`) under which the run path calls into them. The script carries one only when its condition holds.
OPTIONAL_MODULES = {
    "pgolf.eval.sliding": "cfg.eval.sliding_stride > 0",
    "pgolf.eval.ttt": "cfg.eval.ttt",
    "pgolf.eval.warmup": "cfg.eval.precompile",
    "pgolf.eval.documents": "cfg.eval.doc_isolated or cfg.eval.precompile",
    "pgolf.eval.ttt_doc": "cfg.eval.ttt and cfg.eval.ttt_mode == 'doc_lora'",
    "pgolf.model.doc_attention": "cfg.train.doc_mask or cfg.eval.doc_isolated or "
                                 "(cfg.eval.ttt and cfg.eval.ttt_mode == 'doc_lora')",
    "pgolf.quant.pipeline": "cfg.quant.enabled",
    "pgolf.quant.hessian": "cfg.quant.enabled and cfg.quant.method == 'gptq' and cfg.quant.calib_batches > 0",
}
# Never in the script, even when a run-path module imports them lazily: the exporter itself (the script passes
# its own size to train_run as code_bytes, so the run path does not generate one).
NEVER_BUNDLED = ("pgolf.export",)
BASE_PACKAGES = frozenset({"torch", "numpy", "sentencepiece"})
CODEC_PACKAGES = {"zstd": ("zstandard",), "brotli": ("brotli",), "auto": ("zstandard", "brotli"),
                  "zlib": (), "lzma": ()}
ALL_CODEC_PACKAGES = frozenset({"zstandard", "brotli"})
# Calls that ask whether a package module exists: resolved when the script is generated.
PRESENCE_CALLS = {"module_exists": ("True", "False"), "find_spec": ("True", "None")}


class AmalgamationError(UserError):
    """The package cannot be turned into one file (a name clash, a forbidden import, a stray pgolf import)."""


@dataclass
class ParsedModule:
    name: str
    path: Path
    source: str
    tree: ast.Module
    parents: dict = field(default_factory=dict)


def module_file(name: str) -> Path:
    parts = name.split(".")
    if parts[0] != "pgolf":
        raise AmalgamationError(f"{name}: not a pgolf module")
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AmalgamationError(f"{name}: no such module under {PACKAGE_ROOT}")


def parse_module(name: str) -> ParsedModule:
    path = module_file(name)
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise AmalgamationError(f"{path}:{e.lineno}: cannot parse ({e.msg})") from None
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return ParsedModule(name, path, source, tree, parents)


def is_package_import(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "pgolf"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "pgolf" for a in node.names)
    return False


def package_imports(mod: ParsedModule) -> list[tuple[str, bool]]:
    """(imported module, lazy) for each `from pgolf.x import y` of mod; lazy = not at module level.

    Relative imports, `import pgolf.x` and aliased names are errors: the single file has no modules."""
    out = []
    for node in ast.walk(mod.tree):
        if not is_package_import(node):
            continue
        where = f"{mod.path.name}:{node.lineno}"
        if isinstance(node, ast.Import) or node.level > 0:
            raise AmalgamationError(f"{mod.name} ({where}): package imports must be `from pgolf.x import name`")
        for alias in node.names:
            if alias.asname and alias.asname != alias.name:
                raise AmalgamationError(f"{mod.name} ({where}): `{alias.name} as {alias.asname}` cannot be "
                                        f"amalgamated; import the name unaliased")
        out.append((node.module, mod.parents.get(node) is not mod.tree))
    return out


def module_manifest(cfg: RunConfig) -> tuple[list[str], dict[str, str]]:
    """The modules the run path of cfg uses, dependencies first, and the optional modules left out
    ({module: condition}). A module imported at module level comes before its importer."""
    order: list[str] = []
    left_out: dict[str, str] = {}
    visiting: list[str] = []

    def visit(name: str, lazy: bool) -> None:
        if name in order:
            return
        if name in visiting:
            raise AmalgamationError(f"import cycle at module level: {' -> '.join(visiting + [name])}")
        if name.startswith(NEVER_BUNDLED):
            if not lazy:
                raise AmalgamationError(f"{visiting[-1]} imports {name} at module level; the script cannot "
                                        f"carry {name}: import it inside the function that needs it")
            left_out[name] = "False"
            return
        condition = OPTIONAL_MODULES.get(name)
        if lazy and condition and not eval(condition, {"__builtins__": {}}, {"cfg": cfg}):
            left_out[name] = condition
            return
        left_out.pop(name, None)
        visiting.append(name)
        for dep, dep_lazy in package_imports(parse_module(name)):
            visit(dep, dep_lazy)
        visiting.pop()
        order.append(name)

    for root in MANIFEST_ROOTS:
        visit(root, False)
    return order, {k: v for k, v in left_out.items() if k not in order}


def bound_names(stmt) -> list[tuple[str, str]]:
    """(name, binding) for the top-level names stmt binds; binding is "def" or the import it comes from."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [(stmt.name, "def")]
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        out = []
        for a in stmt.names:
            if isinstance(stmt, ast.Import):
                bound = a.name if a.asname else a.name.split(".")[0]  # `import a.b` binds module a
                out.append((a.asname or bound, f"import {bound}"))
            else:
                out.append((a.asname or a.name, f"from {stmt.module} import {a.name}"))
        return out
    if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [(n.id, "def") for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    out = []
    for child_field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(stmt, child_field, []) or []:
            out.extend(bound_names(child))
    return out


def check_unique_names(modules: list[ParsedModule]) -> dict[str, str]:
    """{name: module} of every top-level name; AmalgamationError naming both modules on a clash.

    A name bound by the same third-party import in two modules is shared, not a clash; names bound by
    package imports are the same object as their definition and are skipped."""
    owner: dict[str, tuple[str, str]] = {}
    clashes = []
    for mod in modules:
        for stmt in mod.tree.body:
            if is_package_import(stmt):
                continue
            for name, binding in bound_names(stmt):
                prev = owner.get(name)
                if prev is None:
                    owner[name] = (mod.name, binding)
                elif prev[0] != mod.name and not (binding != "def" and binding == prev[1]):
                    clashes.append(f"{name!r} in {prev[0]} and {mod.name}")
    if clashes:
        raise AmalgamationError("top-level names must be unique across the amalgamated modules: "
                                + "; ".join(sorted(set(clashes))))
    return {name: mod for name, (mod, _) in owner.items()}


def check_imported_names(modules: list[ParsedModule]) -> None:
    """Every `from pgolf.x import y` must name something pgolf.x binds at top level."""
    defined = {m.name: {n for s in m.tree.body for n, _ in bound_names(s)} for m in modules}
    for mod in modules:
        for node in ast.walk(mod.tree):
            if not is_package_import(node):
                continue
            names = defined.get(node.module)
            if names is None:
                names = {n for s in parse_module(node.module).tree.body for n, _ in bound_names(s)}
            missing = [a.name for a in node.names if a.name not in names]
            if missing:
                raise AmalgamationError(f"{mod.name} ({mod.path.name}:{node.lineno}) imports {missing} from "
                                        f"{node.module}, which does not define them")


def import_roots(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [(node.module or "").split(".")[0]]
    return [node.args[0].value.split(".")[0]]  # importlib.import_module("name")


def is_dynamic_import(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def guarded_by_import_error(mod: ParsedModule, node) -> bool:
    """True when node sits in the body of a `try` with an `except ImportError` (or ModuleNotFoundError)."""
    child, parent = node, mod.parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for h in parent.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types):
                    return True
        child, parent = parent, mod.parents.get(parent)
    return False


def check_third_party(modules: list[ParsedModule], codec: str) -> dict[str, list[str]]:
    """Classify every non-package import; AmalgamationError on one outside the allowed set.

    Returns {"required": [...], "optional": [...]} third-party roots (stdlib left out)."""
    chosen = set(CODEC_PACKAGES.get(codec, ALL_CODEC_PACKAGES))
    required, optional, bad = set(), set(), []
    for mod in modules:
        for node in ast.walk(mod.tree):
            if not (isinstance(node, (ast.Import, ast.ImportFrom)) or is_dynamic_import(node)):
                continue
            if is_package_import(node):
                continue
            top_level = mod.parents.get(node) is mod.tree
            for root in import_roots(node):
                if root in sys.stdlib_module_names:
                    continue
                if root in BASE_PACKAGES or (root in chosen and top_level):
                    required.add(root)
                elif guarded_by_import_error(mod, node):
                    optional.add(root)
                elif root in ALL_CODEC_PACKAGES and not top_level:
                    (required if root in chosen else optional).add(root)
                else:
                    bad.append(f"{root} ({mod.path.name}:{node.lineno})")
    if bad:
        raise AmalgamationError(f"the script may import only stdlib, torch, numpy, sentencepiece and the codec "
                                f"library of quant.codec={codec!r}; found {', '.join(sorted(bad))}")
    return {"required": sorted(required), "optional": sorted(optional - required)}


def docstring_nodes(tree: ast.Module) -> list:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.append(first)
    return out


def statement_lists(tree: ast.Module):
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            stmts = getattr(node, name, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt) and node is not tree:
                yield stmts


def presence_replacement(node, included: set[str]) -> str | None:
    """"True"/"False" (or "None") for `module_exists("pgolf.x")` / `find_spec("pgolf.x")`, else None."""
    if not (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
        return None
    name = getattr(node.func, "attr", getattr(node.func, "id", None))
    target = node.args[0].value
    if name not in PRESENCE_CALLS or not isinstance(target, str) or not target.startswith("pgolf."):
        return None
    yes, no = PRESENCE_CALLS[name]
    return yes if target in included else no


def transform_module(mod: ParsedModule, included: set[str], strip_docstrings: bool) -> tuple[str, list]:
    """(body text, hoisted import statements) of one module, ready to concatenate."""
    hoisted = [s for s in mod.tree.body if isinstance(s, (ast.Import, ast.ImportFrom)) and not is_package_import(s)]
    removed = set(hoisted) | {n for n in ast.walk(mod.tree) if is_package_import(n)}
    for stmt in mod.tree.body:
        if isinstance(stmt, ast.If) and "__name__" in ast.unparse(stmt.test):
            raise AmalgamationError(f"{mod.name} ({mod.path.name}:{stmt.lineno}): an `if __name__` block "
                                    f"cannot go into the single file")
    if strip_docstrings:
        removed |= set(docstring_nodes(mod.tree))
    needs_pass = {stmts[0] for stmts in statement_lists(mod.tree) if all(s in removed for s in stmts)}
    edits = [(n, "pass" if n in needs_pass else None) for n in removed]
    edits += [(n, text) for n in ast.walk(mod.tree) if (text := presence_replacement(n, included))]
    return apply_edits(mod, edits), hoisted


def apply_edits(mod: ParsedModule, edits: list) -> str:
    """Apply (node, replacement) edits: None drops the node's lines, text replaces its span."""
    lines = mod.source.encode("utf-8").splitlines(keepends=True)
    for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        a, b = node.lineno - 1, node.end_lineno - 1
        head, tail = lines[a][:node.col_offset], lines[b][node.end_col_offset:]
        whole = not head.strip() and tail.strip() in (b"", b";") and isinstance(node, ast.stmt)
        if whole and text is None:
            del lines[a:b + 1]
        elif whole:
            lines[a:b + 1] = [head + text.encode() + b"\n"]
        elif isinstance(node, ast.stmt) and text is None:
            raise AmalgamationError(f"{mod.path.name}:{node.lineno}: put this statement on its own line")
        else:
            lines[a:b + 1] = [head + (text or "pass").encode() + tail]
    return b"".join(lines).decode("utf-8").strip("\n") + "\n"


def drop_comments(source: str) -> str:
    """source without its comments; lines that held only a comment go away."""
    cuts = {tok.start[0] - 1: tok.start[1] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}
    out = []
    for i, line in enumerate(source.splitlines(keepends=True)):
        if i in cuts:
            kept = line[:cuts[i]].rstrip()
            if not kept:
                continue
            line = kept + "\n"
        out.append(line)
    return "".join(out)


def hoisted_import_lines(statements: list) -> list[str]:
    """De-duplicated import lines: `from __future__` first, then `import x` lines, then merged `from x`."""
    plain, from_names = set(), {}
    for s in statements:
        if isinstance(s, ast.Import):
            plain.update(f"import {a.name}" + (f" as {a.asname}" if a.asname else "") for a in s.names)
        else:
            names = from_names.setdefault(s.module, set())
            names.update(a.name + (f" as {a.asname}" if a.asname else "") for a in s.names)
    future = [f"from __future__ import {', '.join(sorted(from_names.pop('__future__')))}"] \
        if "__future__" in from_names else []
    froms = [f"from {m} import {', '.join(sorted(n))}" for m, n in sorted(from_names.items())]
    return future + sorted(plain) + froms


def train_run_parameters() -> list[str]:
    """Argument names of pgolf.train.loop.train_run, read from its source."""
    for node in parse_module("pgolf.train.loop").tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "train_run":
            return [a.arg for a in node.args.args + node.args.kwonlyargs]
    raise AmalgamationError("pgolf/train/loop.py has no train_run")


def amalgamate(cfg: RunConfig, strip_docstrings: bool = True, strip_comments: bool = True) -> tuple[str, dict]:
    """(source of train_gpt.py for cfg, info): info has "modules", "left_out", "packages"."""
    validate_config(cfg)
    names, left_out = module_manifest(cfg)
    modules = [parse_module(n) for n in names]
    check_imported_names(modules)
    packages = check_third_party(modules, cfg.quant.codec)
    section = hyperparameters_section(cfg, left_out, "code_bytes" in train_run_parameters())
    generated = ParsedModule("<generated Hyperparameters section>", Path("train_gpt.py"), section,
                             ast.parse(section))
    check_unique_names(modules + [generated])
    bodies, hoisted = [], [s for s in generated.tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
    for mod in modules:
        body, imports = transform_module(mod, set(names), strip_docstrings)
        body = drop_comments(body) if strip_comments else body
        hoisted += imports
        bodies.append(f"# ---- {mod.path.relative_to(PACKAGE_ROOT.parent).as_posix()}\n\n{body}")
    section_body = "\n".join(line for line in section.splitlines() if not line.startswith(("import ", "from ")))
    header = (f'"""train_gpt.py: recipe {cfg.recipe or "(custom)"!r} (config {config_hash(cfg)}), generated by '
              f'`pgolf export` from the pgolf modules below.\n\nRun: torchrun --standalone --nproc_per_node=8 '
              f'train_gpt.py   (or: python train_gpt.py). Settings: the env vars of Hyperparameters.FIELDS.\n"""')
    parts = [header, "\n".join(hoisted_import_lines(hoisted)), *bodies,
             "# ---- generated: Hyperparameters and main\n\n" + section_body.strip("\n") + "\n"]
    source = "\n\n\n".join(p.rstrip("\n") for p in parts) + "\n"
    ast.parse(source)
    return source, {"modules": names, "left_out": left_out, "packages": packages}


def wrap_compressed(source: str) -> str:
    """The lzma + base85 self-extracting two-line form of a script (pgolf.quant.size.wrap_script)."""
    return wrap_script(source)


def export_script(cfg: RunConfig, out_path, compressed="auto", strip_docstrings: bool = True,
                  strip_comments: bool = True) -> dict:
    """Write train_gpt.py for cfg: the plain form, the compressed form, or ("auto") whichever has fewer bytes.

    Returns {"path", "form", "bytes", "plain_bytes", "compressed_bytes", "modules", "left_out", "packages"}."""
    if compressed not in ("auto", True, False):
        raise UserError(f"compressed={compressed!r} must be 'auto', True or False")
    source, info = amalgamate(cfg, strip_docstrings, strip_comments)
    wrapped = wrap_compressed(source)
    plain_bytes, wrapped_bytes = len(source.encode()), len(wrapped.encode())
    use_wrapped = compressed is True or (compressed == "auto" and wrapped_bytes < plain_bytes)
    text = wrapped if use_wrapped else source
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, text)
    return {"path": str(out_path), "form": "compressed" if use_wrapped else "plain",
            "bytes": out_path.stat().st_size, "plain_bytes": plain_bytes, "compressed_bytes": wrapped_bytes, **info}
