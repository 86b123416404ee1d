"""A JSONL corpus built from text that ships with Python itself, for `pgolf demo` and offline tests.

Documents: the pydoc help topics (`pydoc_data.topics`), then for each standard-library module (packages with
their direct submodules) its docstring and the docstrings of the classes, methods and functions it defines,
shuffled with a fixed seed (so that any prefix is a sample and near-identical neighbours such as the codec
modules under `encodings` do not come in one long run). Modules that cannot be imported are skipped; modules
whose import has side effects (opening a browser or a window, printing) are never imported.
"""

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import random
import sys
import warnings
from pathlib import Path

# Imports with side effects (browser, windows, printing) or of test suites / GUI toolkits / deprecated tools.
STDLIB_SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "__hello__",
               "__phello__", "lib2to3", "ensurepip", "distutils", "pydoc_data", "xxlimited", "xxlimited_35",
               "xxsubtype", "_testcapi", "_testinternalcapi", "_testbuffer", "_testimportmultiple",
               "_testmultiphase", "_xxtestfuzz", "_ctypes_test", "_testclinic", "_testsinglephase",
               "msilib", "crypt", "nis", "spwd")


STDLIB_SHUFFLE_SEED = 1337


def stdlib_module_names() -> list[str]:
    """Public top-level standard-library modules, sorted, minus STDLIB_SKIP."""
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in STDLIB_SKIP:
            continue
        names.append(name)
    return names


def _import_quietly(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # any failure (ImportError, SystemExit, OSError) skips the module
            return None


def _member_docs(module) -> list[str]:
    parts = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"class {name}\n{doc}")
            for mname, member in sorted(vars(obj).items()):
                mdoc = inspect.getdoc(member) if inspect.isfunction(member) and not mname.startswith("_") else None
                if mdoc:
                    parts.append(f"{name}.{mname}\n{mdoc}")
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}\n{doc}")
    return parts


def _module_document(module) -> str | None:
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading some attributes (typing.re, ...) warns of deprecation
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
        parts += _member_docs(module)
    if not parts:
        return None
    return f"Module {module.__name__}\n\n" + "\n\n".join(parts)


def iter_stdlib_documents():
    """Yield document texts: pydoc topics, then standard-library module docs."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield f"Help topic {key}\n\n{text}"
    for name in stdlib_module_names():
        module = _import_quietly(name)
        if module is None:
            continue
        mods = [module]
        if hasattr(module, "__path__"):
            subs = sorted(info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_"))
            mods += [m for m in (_import_quietly(f"{name}.{s}") for s in subs) if m is not None]
        for mod in mods:
            text = _module_document(mod)
            if text:
                yield text


def write_stdlib_corpus(path, max_bytes: int | None = None) -> tuple[int, int]:
    """Write the corpus as JSONL ({"text": ...} a line); stop before max_bytes of text. Return (docs, bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    docs = total = 0
    texts = list(iter_stdlib_documents())
    random.Random(STDLIB_SHUFFLE_SEED).shuffle(texts)
    with open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            size = len(text.encode("utf-8"))
            if max_bytes is not None and total + size > max_bytes:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            docs += 1
            total += size
    os.replace(tmp, path)
    return docs, total
