"""Generate the single-file `train_gpt.py` of a config from the package's own modules.

What goes in is declared, not discovered: the modules of pgolf/export/manifest.py (SCRIPT_MODULES, in its
order, the conditional ones only where the config needs them), then a generated `Hyperparameters` table of
the typed config (pgolf/export/hyperparams.py) and the line that runs it (pgolf/export/script_entry.py), so
the file runs like the challenge's: `torchrun --standalone --nproc_per_node=N train_gpt.py`.

Each module's text goes in as it is, except for these line rules. Python's tokenizer only splits the text
into statements, strings and comments; no code is parsed or run to decide anything.
- A statement `from pgolf.x import a, b` (one or more lines, at any indentation) is removed: the names
  resolve in the one shared namespace, because top-level names are unique across the modules (checked
  here for `def`, `class` and `NAME =` at column 0). x must be in the manifest; when the statement is at
  column 0 (module level), x must be in this script and come earlier. `import pgolf.x`, relative imports
  and `from pgolf.x import a as b` are errors: the single file has no modules to alias.
- A third-party or stdlib import at column 0 is hoisted to the top of the file, merged and de-duplicated;
  an indented one stays where it is. Its package must be one the manifest allows (stdlib, torch, numpy,
  sentencepiece, the codec libraries, the optional packages; at column 0 only stdlib, the base packages and
  quant.codec's library).
- With strip_docstrings, a statement that is only a string and comes first in the module or in the body of
  a `def` / `class` is removed. With strip_comments, comments and blank lines are removed (never inside a
  string). A block left empty gets `pass`.
- A column-0 `if __name__` block is an error (it would run inside the single file).
"""

import io
import keyword
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.config import RunConfig, config_hash
from pgolf.config_rules import validate_config
from pgolf.errors import UserError
from pgolf.export.hyperparams import settings_section
from pgolf.export.manifest import (
    OUTSIDE_SCRIPT,
    import_allowed,
    left_out_conditions,
    module_manifest,
    script_packages,
)
from pgolf.fileio import atomic_write_text
from pgolf.quant.size import wrap_script

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
SKIPPED_TOKENS = (tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER)


class AmalgamationError(UserError):
    """The modules cannot be turned into one file (a name clash, a forbidden or stray import)."""


@dataclass
class Statement:
    """One logical line of a module: 0-based first and last line, the column it starts at, its tokens (no
    comments or line breaks), the block it belongs to (0: module level) and the statement opening that block."""
    first: int
    last: int
    col: int
    words: list
    types: list
    block: int
    header: "Statement | None"
    first_in_block: bool


@dataclass
class ModuleText:
    """A module ready to concatenate: its body, its hoisted imports and the top-level names it defines."""
    name: str
    path: Path
    body: str
    hoisted: list = field(default_factory=list)  # ("import", name, alias) or ("from", module, name, alias)
    defined: list = field(default_factory=list)  # (name, line)


def module_file(name: str) -> Path:
    parts = name.split(".")
    if parts[0] != "pgolf":
        raise AmalgamationError(f"{name}: not a pgolf module")
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AmalgamationError(f"{name}: no such module under {PACKAGE_ROOT}")


def scan(source: str, where: str) -> tuple[list[Statement], dict[int, int], set[int]]:
    """(statements, {line: column of its comment}, lines inside a multi-line token) of source."""
    statements, comments, inside = [], {}, set()
    blocks, headers, seen, current = [0], {0: None}, set(), []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            inside.update(range(tok.start[0], tok.end[0]))
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0] - 1] = tok.start[1]
            elif tok.type == tokenize.INDENT:
                blocks.append(len(headers))
                headers[blocks[-1]] = statements[-1] if statements else None
            elif tok.type == tokenize.DEDENT:
                blocks.pop()
            elif tok.type == tokenize.NEWLINE and current:
                block = blocks[-1]
                statements.append(Statement(current[0].start[0] - 1, current[-1].end[0] - 1, current[0].start[1],
                                            [t.string for t in current], [t.type for t in current], block,
                                            headers[block], block not in seen))
                seen.add(block)
                current = []
            elif tok.type not in SKIPPED_TOKENS + (tokenize.NEWLINE,):
                current.append(tok)
    except (tokenize.TokenError, SyntaxError) as e:
        raise AmalgamationError(f"{where}: cannot be tokenized ({e})") from None
    return statements, comments, inside


def is_docstring(stmt: Statement) -> bool:
    if not stmt.first_in_block or any(t != tokenize.STRING for t in stmt.types):
        return False
    return stmt.block == 0 or stmt.header.words[0] in ("def", "class", "async")


def imported_names(words: list) -> list[tuple[str, str | None]]:
    """[(dotted name, alias or None)] of the part of an import statement after `import`."""
    out, chunk = [], []
    for w in [w for w in words if w not in ("(", ")")] + [","]:
        if w != ",":
            chunk.append(w)
        elif chunk:
            alias = chunk[-1] if len(chunk) > 2 and chunk[-2] == "as" else None
            out.append(("".join(chunk[:-2] if alias else chunk), alias))
            chunk = []
    return out


def import_parts(stmt: Statement, where: str) -> tuple[str | None, list] | None:
    """(module of `from module import`, or None for `import`, [(name, alias)]), or None: not an import."""
    words = stmt.words
    if words[0] not in ("import", "from"):
        return None
    if ";" in words:
        raise AmalgamationError(f"{where}: put this import on its own line, without `;`")
    if words[0] == "import":
        return None, imported_names(words[1:])
    at = words.index("import")
    return "".join(words[1:at]), imported_names(words[at + 1:])


def check_package_import(module: str | None, names: list, stmt: Statement, where: str, owner: str,
                         placed: dict[str, int], left_out: dict[str, str]) -> None:
    """The rules for a `from pgolf.x import ...` of module `owner` (placed: {module: index in the script})."""
    if module is None or module.startswith("."):
        raise AmalgamationError(f"{where}: package imports must be `from pgolf.x import name`")
    aliased = [f"{n} as {a}" for n, a in names if a and a != n]
    if aliased:
        raise AmalgamationError(f"{where}: `{aliased[0]}` cannot go into the single file; import it unaliased")
    top = stmt.col == 0
    if module in placed:
        if top and placed[module] >= placed[owner]:
            raise AmalgamationError(f"{where}: {owner} imports {module} at module level, so {module} must come "
                                    f"before it in SCRIPT_MODULES (pgolf/export/manifest.py)")
    elif module in left_out:
        if top:
            why = "it is never in the script" if module in OUTSIDE_SCRIPT else f"it is in only when {left_out[module]}"
            raise AmalgamationError(f"{where}: {owner} imports {module} at module level, but {why}: import it "
                                    f"inside the function that needs it")
    else:
        raise AmalgamationError(f"{where}: {owner} imports {module}, which is not in SCRIPT_MODULES "
                                f"(pgolf/export/manifest.py): add its row after the modules it imports")


def classify(stmt: Statement, where: str, mod: ModuleText, placed: dict, left_out: dict, codec: str) -> bool:
    """Apply the import rules to stmt; True when it leaves the module text (a package import, a hoisted one)."""
    if "pgolf" in stmt.words[1:] and stmt.words[stmt.words.index("pgolf") - 1] in ("import", "from") \
            and stmt.words[0] not in ("import", "from"):
        raise AmalgamationError(f"{where}: put this pgolf import on its own line")
    parts = import_parts(stmt, where)
    if parts is None:
        if stmt.col == 0 and stmt.words[:2] == ["if", "__name__"]:
            raise AmalgamationError(f"{where}: an `if __name__` block cannot go into the single file")
        return False
    module, names = parts
    roots = [module.split(".")[0]] if module is not None else [n.split(".")[0] for n, _ in names]
    if "pgolf" in roots or (module or "").startswith("."):
        check_package_import(module, names, stmt, where, mod.name, placed, left_out)
        return True
    bad = [r for r in roots if not import_allowed(r, stmt.col == 0, codec)]
    if bad:
        raise AmalgamationError(f"{where}: the script may not import {bad[0]} here (quant.codec={codec!r}; "
                                f"allowed: pgolf/export/manifest.py)")
    if stmt.col != 0:
        return False
    mod.hoisted += [("import", n, a) if module is None else ("from", module, n, a) for n, a in names]
    return True


def top_level_names(stmt: Statement) -> list[str]:
    """Names a column-0 `def`, `class` or `NAME = ...` / `NAME: T = ...` / `A, B = ...` binds."""
    w = stmt.words
    if w[0] in ("def", "class"):
        return [w[1]]
    if w[:2] == ["async", "def"]:
        return [w[2]]
    if stmt.types[0] == tokenize.NAME and not keyword.iskeyword(w[0]) and len(w) > 1 and w[1] in ("=", ":", ","):
        end = next(i for i, x in enumerate(w + ["="]) if x in ("=", ":"))
        return [x for x in w[:end] if x != ","]
    return []


def module_text(name: str, placed: dict, left_out: dict, codec: str, strip_docstrings: bool,
                strip_comments: bool) -> ModuleText:
    """One module of the script: its file's text under the line rules of this module's docstring."""
    path = module_file(name)
    return transform_text(name, path, path.read_text(encoding="utf-8"), placed, left_out, codec,
                          strip_docstrings, strip_comments)


def transform_text(name: str, path: Path, source: str, placed: dict, left_out: dict, codec: str,
                   strip_docstrings: bool, strip_comments: bool) -> ModuleText:
    """The text of module `name` (source, read from path) under the line rules, ready to concatenate."""
    rel = path.relative_to(PACKAGE_ROOT.parent).as_posix() if path.is_absolute() else path.as_posix()
    statements, comments, inside = scan(source, rel)
    mod = ModuleText(name, path, "")
    removed, kept_blocks = [], set()
    for stmt in statements:
        where = f"{rel}:{stmt.first + 1}"
        if classify(stmt, where, mod, placed, left_out, codec) or (strip_docstrings and is_docstring(stmt)):
            removed.append(stmt)
            continue
        kept_blocks.add(stmt.block)
        if stmt.col == 0:
            mod.defined += [(n, where) for n in top_level_names(stmt)]
    lines = source.splitlines(keepends=True)
    dropped = {i for stmt in removed for i in range(stmt.first, stmt.last + 1)}
    for stmt in removed:  # a block whose statements all went keeps one `pass`
        if stmt.block != 0 and stmt.block not in kept_blocks:
            kept_blocks.add(stmt.block)
            dropped.discard(stmt.first)
            lines[stmt.first] = " " * stmt.col + "pass\n"
    out = []
    for i, line in enumerate(lines):
        if i in dropped:
            continue
        if strip_comments and i in comments and i not in inside:
            line = line[:comments[i]].rstrip() + "\n"
        if strip_comments and not line.strip() and i not in inside:
            continue
        out.append(line)
    mod.body = "".join(out).strip("\n") + "\n"
    return mod


def check_unique_names(modules: list[ModuleText]) -> None:
    """Top-level names must be unique across the modules; one third-party import in several modules is one
    binding, not a clash. AmalgamationError naming both places of every clash."""
    owner, clashes = {}, []
    for mod in modules:
        bindings = [(name, "def", where) for name, where in mod.defined]
        for entry in mod.hoisted:
            if entry[0] == "import":  # `import a.b` binds a, `import a.b as c` binds c
                name = entry[2] or entry[1].split(".")[0]
                binding = f"import {entry[1] if entry[2] else name}"
            else:
                name, binding = entry[3] or entry[2], f"from {entry[1]} import {entry[2]}"
            bindings.append((name, binding, mod.name))
        for name, binding, where in bindings:
            prev = owner.setdefault(name, (binding, where, mod.name))
            if prev[2] != mod.name and (binding == "def" or binding != prev[0]):
                clashes.append(f"{name!r} in {prev[1]} and {where}")
    if clashes:
        raise AmalgamationError("top-level names must be unique across the script's modules: "
                                + "; ".join(sorted(set(clashes))))


def hoisted_import_lines(entries: list) -> list[str]:
    """De-duplicated import lines: `from __future__` first, then `import x` lines, then merged `from x`."""
    plain, from_names = set(), {}
    for entry in entries:
        alias = f" as {entry[-1]}" if entry[-1] else ""
        if entry[0] == "import":
            plain.add(f"import {entry[1]}{alias}")
        else:
            from_names.setdefault(entry[1], set()).add(entry[2] + alias)
    future = [f"from __future__ import {', '.join(sorted(from_names.pop('__future__')))}"] \
        if "__future__" in from_names else []
    froms = [f"from {m} import {', '.join(sorted(n))}" for m, n in sorted(from_names.items())]
    return future + sorted(plain) + froms


def amalgamate(cfg: RunConfig, strip_docstrings: bool = True, strip_comments: bool = True) -> tuple[str, dict]:
    """(source of train_gpt.py for cfg, info): info has "modules", "left_out" and "packages"."""
    validate_config(cfg)
    names, left_out = module_manifest(cfg)
    placed = {name: i for i, name in enumerate(names)}
    modules = [module_text(name, placed, left_out, cfg.quant.codec, strip_docstrings, strip_comments)
               for name in names]
    tail = ModuleText("<generated Hyperparameters>", Path("train_gpt.py"),
                      settings_section(cfg, left_out_conditions(cfg)), defined=[("Hyperparameters", "tail")])
    check_unique_names(modules + [tail])
    header = (f'"""train_gpt.py: recipe {cfg.recipe or "(custom)"!r} (config {config_hash(cfg)}), generated by '
              f'`pgolf export` from the modules of pgolf/export/manifest.py.\n\nRun: torchrun --standalone '
              f'--nproc_per_node=8 train_gpt.py   (or: python train_gpt.py). Settings: the env vars of '
              f'Hyperparameters.FIELDS.\n"""')
    marker = (lambda m: f"# ---- {m.path.relative_to(PACKAGE_ROOT.parent).as_posix()}\n") if not strip_comments \
        else (lambda m: "")
    gap = "\n" if strip_comments else "\n\n\n"
    parts = [header, "\n".join(hoisted_import_lines([e for m in modules for e in m.hoisted]))]
    parts += [marker(m) + m.body for m in modules] + [tail.body]
    source = gap.join(p.rstrip("\n") for p in parts) + "\n"
    try:  # a syntax check of the output, after everything is decided
        compile(source, "train_gpt.py", "exec", dont_inherit=True)
    except SyntaxError as e:
        raise AmalgamationError(f"the generated train_gpt.py does not compile: line {e.lineno}: {e.msg}") from None
    return source, {"modules": names, "left_out": left_out, "packages": script_packages(cfg.quant.codec)}


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
