"""What the generated train_gpt.py is made of: a declared list of package modules and third-party packages.

SCRIPT_MODULES is the whole run path of `train_run`, in dependency order (a module comes after every module it
imports at module level). Most modules are always in; the few that only some configs call into carry a `When`,
a config condition, and the script holds them only when it is true for the exported config. The exporter
reads nothing to decide this: it takes this list as it stands, and refuses (pgolf.export.amalgamate) a module
whose `from pgolf.x import ...` names a module the list does not hold, or names a later one at module level.

A new module on the run path gets one row here, after the modules it imports; a module that only a flag uses
gets `when=any_of("section.field")`.
"""

import sys
from dataclasses import dataclass

from pgolf.config import RunConfig
from pgolf.errors import UserError
from pgolf.export.hyperparams import config_leaves
from pgolf.export.script_entry import condition_holds


@dataclass(frozen=True)
class When:
    """A config condition. mode "any": one term holds; "all": every term does. A term is a config key
    ("eval.ttt": the field is on, non-zero or non-empty) or (key, value) (the field equals value)."""
    mode: str
    terms: tuple

    def holds(self, values: dict) -> bool:
        """True when the condition holds for the flat config values {"section.field": value}."""
        missing = [t for t in self.terms if (t if isinstance(t, str) else t[0]) not in values]
        if missing:
            raise UserError(f"pgolf/export/manifest.py: condition on unknown config keys {missing}")
        return condition_holds(values, self.mode, self.terms)

    def describe(self) -> str:
        words = [f"cfg.{t}" if isinstance(t, str) else f"cfg.{t[0]} == {t[1]!r}" for t in self.terms]
        return f" {'or' if self.mode == 'any' else 'and'} ".join(words)


def any_of(*terms) -> When:
    return When("any", terms)


def all_of(*terms) -> When:
    return When("all", terms)


@dataclass(frozen=True)
class ScriptModule:
    name: str
    when: When | None = None  # None: always in the script


SCRIPT_MODULES = (
    ScriptModule("pgolf.errors"),
    ScriptModule("pgolf.config"),
    ScriptModule("pgolf.config_rules"),
    ScriptModule("pgolf.data.shards"),
    ScriptModule("pgolf.data.loader"),
    ScriptModule("pgolf.fileio"),
    ScriptModule("pgolf.runrecord"),
    ScriptModule("pgolf.runlog"),
    ScriptModule("pgolf.data.manifest"),
    ScriptModule("pgolf.data.corpus"),
    ScriptModule("pgolf.data.tokenizer"),
    ScriptModule("pgolf.dist"),
    ScriptModule("pgolf.model.fp8"),
    ScriptModule("pgolf.quant.policy"),
    ScriptModule("pgolf.quant.formats"),
    ScriptModule("pgolf.model.layers"),
    ScriptModule("pgolf.model.kv_cache",
                 all_of("eval.ttt", ("eval.ttt_mode", "doc_lora"), ("eval.ttt_doc_context", "cache"))),
    ScriptModule("pgolf.model.fused_qk"),
    ScriptModule("pgolf.model.doc_attention",
                 any_of("train.doc_mask", "eval.doc_isolated", ("eval.ttt_mode", "doc_lora"))),
    ScriptModule("pgolf.model.attention"),
    ScriptModule("pgolf.model.features"),
    ScriptModule("pgolf.model.fused_ce"),
    ScriptModule("pgolf.model.gpt"),
    ScriptModule("pgolf.optim.muon"),
    ScriptModule("pgolf.optim.schedules"),
    ScriptModule("pgolf.optim.builder"),
    ScriptModule("pgolf.tensorfile"),
    ScriptModule("pgolf.train.averaging"),
    ScriptModule("pgolf.train.checkpoint"),
    ScriptModule("pgolf.train.clock"),
    ScriptModule("pgolf.data.bytes"),
    ScriptModule("pgolf.eval.scoring"),
    ScriptModule("pgolf.eval.bpb"),
    ScriptModule("pgolf.eval.legality"),
    ScriptModule("pgolf.eval.receipts"),
    ScriptModule("pgolf.eval.runner"),
    ScriptModule("pgolf.quant.codecs"),
    ScriptModule("pgolf.quant.pack"),
    ScriptModule("pgolf.quant.lqer"),
    ScriptModule("pgolf.quant.grouping"),
    ScriptModule("pgolf.quant.artifact"),
    ScriptModule("pgolf.quant.fit"),
    ScriptModule("pgolf.quant.gptq"),
    ScriptModule("pgolf.quant.size"),
    # train.qat estimates its clip k with the pipeline's search (quant.fit_k) even when the export is off
    ScriptModule("pgolf.quant.pipeline", any_of("quant.enabled", "quant.fit_k")),
    ScriptModule("pgolf.data.caseops"),
    ScriptModule("pgolf.data.sidecar"),
    # TTT scores with the sliding window's helpers, and the eval warmup compiles the TTT passes
    ScriptModule("pgolf.eval.sliding", any_of("eval.sliding_stride", "eval.ttt", "eval.precompile")),
    ScriptModule("pgolf.eval.ttt", any_of("eval.ttt", "eval.precompile")),
    ScriptModule("pgolf.eval.documents",
                 any_of("eval.doc_isolated", "eval.precompile", ("eval.ttt_mode", "doc_lora"))),
    ScriptModule("pgolf.eval.doc_lora", all_of("eval.ttt", ("eval.ttt_mode", "doc_lora"))),
    ScriptModule("pgolf.eval.ttt_doc", all_of("eval.ttt", ("eval.ttt_mode", "doc_lora"))),
    ScriptModule("pgolf.train.finish"),
    ScriptModule("pgolf.train.pipeline"),
    ScriptModule("pgolf.train.progress"),
    ScriptModule("pgolf.train.qat"),
    ScriptModule("pgolf.train.rundir"),
    ScriptModule("pgolf.eval.warmup", any_of("eval.precompile")),
    ScriptModule("pgolf.quant.hessian", all_of("quant.enabled", "quant.calib_batches", ("quant.method", "gptq"))),
    ScriptModule("pgolf.train.state"),
    ScriptModule("pgolf.train.calibration"),
    ScriptModule("pgolf.train.loop"),
    ScriptModule("pgolf.export.script_entry"),
)
# Imported (inside a function) by the run path but never in the script: the exporter itself. The script gives
# train_run its own size as code_bytes, so the run path does not generate a script there.
OUTSIDE_SCRIPT = ("pgolf.export.amalgamate",)

# Third-party packages the script may import: always these, plus the codec library of quant.codec; the
# optional ones only inside `try: ... except ImportError` or a function that checks for them first.
BASE_PACKAGES = ("numpy", "sentencepiece", "torch")
CODEC_PACKAGES = {"zstd": ("zstandard",), "brotli": ("brotli",), "auto": ("brotli", "zstandard"),
                  "zlib": (), "lzma": ()}
OPTIONAL_PACKAGES = ("flash_attn_interface", "triton", "wandb")


def module_manifest(cfg: RunConfig) -> tuple[list[str], dict[str, str]]:
    """(the modules of cfg's script in order, {module left out: why}): the rows of SCRIPT_MODULES whose
    condition holds for cfg, and the others with their condition (OUTSIDE_SCRIPT ones: "never")."""
    values = dict(config_leaves(cfg))
    names, left_out = [], {}
    for row in SCRIPT_MODULES:
        if row.when is None or row.when.holds(values):
            names.append(row.name)
        else:
            left_out[row.name] = row.when.describe()
    left_out.update({name: "never" for name in OUTSIDE_SCRIPT})
    return names, left_out


def left_out_conditions(cfg: RunConfig) -> list[tuple[str, str, tuple]]:
    """(module, mode, terms) of each conditional module cfg's script leaves out: the script refuses a
    setting under which one of them would be needed."""
    values = dict(config_leaves(cfg))
    return [(row.name, row.when.mode, row.when.terms) for row in SCRIPT_MODULES
            if row.when is not None and not row.when.holds(values)]


def script_packages(codec: str) -> dict[str, list[str]]:
    """{"required": [...], "optional": [...]}: the third-party packages a script of quant.codec=codec needs
    (its requirements.txt) and those it uses where present."""
    if codec not in CODEC_PACKAGES:
        raise UserError(f"quant.codec={codec!r}: the exporter knows the codecs {sorted(CODEC_PACKAGES)}")
    chosen = set(CODEC_PACKAGES[codec])
    every_codec = {p for pkgs in CODEC_PACKAGES.values() for p in pkgs}
    return {"required": sorted(set(BASE_PACKAGES) | chosen),
            "optional": sorted(set(OPTIONAL_PACKAGES) | (every_codec - chosen))}


def import_allowed(root: str, top_level: bool, codec: str) -> bool:
    """May an import line of a script module name the package `root`? Stdlib always; at module level the base
    packages and quant.codec's library; inside a function or a `try` also the other codec libraries (codecs
    are chosen at run time) and the optional packages."""
    if root in sys.stdlib_module_names or root in BASE_PACKAGES or root in CODEC_PACKAGES.get(codec, ()):
        return True
    every_codec = {p for pkgs in CODEC_PACKAGES.values() for p in pkgs}
    return not top_level and (root in every_codec or root in OPTIONAL_PACKAGES)
