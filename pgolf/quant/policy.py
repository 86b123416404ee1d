"""The one quantization policy: how every state-dict tensor is stored, decided in one place.

A tensor's role comes from its name (ROLE_PATTERNS, first match wins); the role's row of the table gives
its storage (int rows + fp16 scales, fp16, or raw), bits, method (GPTQ or round-to-nearest), clip rule and
SDClip k, whether quant.fit_k scales that k, whether it may take an LQER correction and its compression
group. quant.overrides then changes single fields by name pattern (seed-systems M3). QAT, GPTQ, the
size fit, the artifact writer, `pgolf quant --explain` and the exporter all ask `tensor_rule` /
`policy_table`; nothing else decides.

Row of the table, per role (cfg = QuantConfig):
- embedding (tok_emb), head (an untied lm head), aux_embed / aux_proj (BigramHash and value-embedding
  tables and projections), other (any other large 2D float): embed_bits, SDClip quant.sdclip_k_embed;
- attn_q / attn_k / attn_v / attn_o, attn (other attention matrices): matrix_bits, quant.sdclip_k_attn;
- mlp_fc / mlp_proj, mlp: matrix_bits, quant.sdclip_k_mlp (both 0 = quant.sdclip_k);
- gate (the attention output gates): int rows at quant.gate_bits with row-max scales, no GPTQ (0 = fp16);
- scalar (non-float, not 2D, or at most quant.passthrough_numel elements): fp16 passthrough (raw if not float).
"""

import dataclasses
import fnmatch

from pgolf.errors import UserError

# (role, name pattern): the first pattern that matches a parameter name gives its role.
ROLE_PATTERNS = (
    ("embedding", "tok_emb.weight"),
    ("head", "head.weight"),
    ("gate", "*attn_gate_w"),
    ("attn_q", "*.attn.c_q.weight"),
    ("attn_k", "*.attn.c_k.weight"),
    ("attn_v", "*.attn.c_v.weight"),
    ("attn_o", "*.attn.proj.weight"),
    ("mlp_fc", "*.mlp.fc.weight"),
    ("mlp_proj", "*.mlp.proj.weight"),
    ("attn", "*attn*"),
    ("mlp", "*mlp*"),
    ("aux_embed", "*.embed.weight"),
    ("aux_proj", "*.proj.weight"),
    ("other", "*"),
)
ROLE_FAMILY = {"attn_q": "attn", "attn_k": "attn", "attn_v": "attn", "attn_o": "attn", "attn": "attn",
               "mlp_fc": "mlp", "mlp_proj": "mlp", "mlp": "mlp", "embedding": "embed", "head": "embed",
               "aux_embed": "embed", "aux_proj": "embed", "other": "embed", "gate": "gate", "scalar": "scalar"}
# The override specs of quant.overrides ("glob=spec+spec"); bitsN for N in 2..8.
OVERRIDE_SPECS = ("fp16", "rtn", "gptq", "matrix", "embed", "lqer", "nolqer")
# Gates smaller than this stay fp16 even with quant.gate_bits (the record's 32 ≤ numel rule).
GATE_MIN_NUMEL = 32


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How one tensor is stored. kind is the artifact's tensor kind (matrix | embed | gate | passthrough)."""

    role: str
    kind: str
    storage: str  # int | fp16 | raw
    bits: int = 0
    method: str = "none"  # gptq | rtn | none
    clip: str = "none"  # sdclip | search | percentile | pct_search | none (row max)
    clip_k: float = 0.0
    fit_ratio: float = 0.0  # > 0: quant.fit_k's matrix k times this ratio is the tensor's k
    lqer: bool = False  # may take an LQER correction (quant.lqer_top_k)
    group: str = ""  # compression group (quant.group_by=role)
    qat: bool = False  # the training fake-quantizer covers it (CastedLinear weights only)
    source: str = "table"  # "table" or the override(s) that changed it

    def k_at(self, matrix_k: float | None) -> float:
        """The SDClip k used: the row's own, or the fitted matrix k times the role's ratio."""
        if matrix_k is not None and self.fit_ratio > 0:
            return float(matrix_k) * self.fit_ratio
        return self.clip_k

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def tensor_role(name: str) -> str:
    """The role of a (non-scalar) tensor, from its name alone."""
    for role, pattern in ROLE_PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return role
    return "other"


def role_clip_k(family: str, cfg) -> float:
    if family == "attn":
        return cfg.sdclip_k_attn or cfg.sdclip_k
    if family == "mlp":
        return cfg.sdclip_k_mlp or cfg.sdclip_k
    return cfg.sdclip_k_embed


def table_rule(name: str, shape: tuple, is_float: bool, cfg) -> QuantRule:
    """The table's row for one tensor before overrides."""
    role = "scalar" if not is_float or len(shape) != 2 else tensor_role(name)
    numel = 1
    for d in shape:
        numel *= int(d)
    if role == "gate" and cfg.gate_bits and numel >= GATE_MIN_NUMEL:  # before the passthrough size rule
        return QuantRule(role, "gate", "int", cfg.gate_bits, "rtn", "none", group="gate")
    if role in ("scalar", "gate") or numel <= cfg.passthrough_numel:
        return QuantRule(role, "passthrough", "fp16" if is_float else "raw", group="passthrough")
    family = ROLE_FAMILY[role]
    k = role_clip_k(family, cfg)
    if family in ("attn", "mlp"):
        return QuantRule(role, "matrix", "int", cfg.matrix_bits, cfg.method, cfg.clip, k,
                         fit_ratio=k / cfg.sdclip_k if cfg.clip == "sdclip" else 0.0, lqer=True, group=role,
                         qat=True)
    return QuantRule(role, "embed", "int", cfg.embed_bits, cfg.method, cfg.clip, k, lqer=True, group=role)


def parse_override(item: str) -> tuple[str, list[str]]:
    """"glob=spec+spec" -> (glob, [spec, ...]); UserError naming the item when malformed."""
    glob, sep, specs = item.partition("=")
    parts = [s.strip() for s in specs.split("+") if s.strip()]
    if not sep or not glob.strip() or not parts:
        raise UserError(f"quant.overrides item {item!r} is not of the form NAME_GLOB=SPEC[+SPEC]")
    for spec in parts:
        if spec not in OVERRIDE_SPECS and not (spec.startswith("bits") and spec[4:] in [str(b) for b in range(2, 9)]):
            raise UserError(f"quant.overrides item {item!r}: spec {spec!r} is not one of "
                            f"{'|'.join(OVERRIDE_SPECS)}|bits2..bits8")
    return glob.strip(), parts


def apply_spec(rule: QuantRule, spec: str, cfg) -> QuantRule:
    """One override spec applied to a rule (scalars that are not float stay raw)."""
    if rule.storage == "raw":
        return rule
    if spec == "fp16":
        return dataclasses.replace(rule, kind="passthrough", storage="fp16", bits=0, method="none", clip="none",
                                   fit_ratio=0.0, lqer=False, qat=False, group="passthrough")
    if rule.storage == "fp16":  # a passthrough tensor asked to be quantized: start from an embed row
        k = role_clip_k(ROLE_FAMILY.get(rule.role, "embed"), cfg)
        rule = dataclasses.replace(rule, kind="embed", storage="int", bits=cfg.embed_bits, method=cfg.method,
                                   clip=cfg.clip, clip_k=k, lqer=True, group=rule.role)
    if spec in ("rtn", "gptq"):
        return dataclasses.replace(rule, method=spec)
    if spec == "matrix":
        return dataclasses.replace(rule, kind="matrix", bits=cfg.matrix_bits)
    if spec == "embed":
        return dataclasses.replace(rule, kind="embed", bits=cfg.embed_bits, fit_ratio=0.0, qat=False)
    if spec in ("lqer", "nolqer"):
        return dataclasses.replace(rule, lqer=spec == "lqer")
    return dataclasses.replace(rule, bits=int(spec[4:]))


def tensor_rule(name: str, shape, is_float: bool, cfg) -> QuantRule:
    """The policy's rule for one tensor: the table's row, then every matching quant.overrides item in order.

    A fitted k (quant.fit_k) applies only to matrix-kind int rows at quant.matrix_bits under SDClip."""
    rule = table_rule(name, tuple(shape), is_float, cfg)
    changed = []
    for item in cfg.overrides:
        glob, specs = parse_override(item)
        if fnmatch.fnmatchcase(name, glob):
            for spec in specs:
                rule = apply_spec(rule, spec, cfg)
            changed.append(item)
    if changed:
        fitted = rule.kind == "matrix" and rule.bits == cfg.matrix_bits and rule.clip == "sdclip"
        rule = dataclasses.replace(rule, source=",".join(changed), qat=rule.qat and rule.storage == "int",
                                   fit_ratio=rule.clip_k / cfg.sdclip_k if fitted else 0.0)
    return rule


def policy_table(shapes: dict, cfg) -> dict[str, QuantRule]:
    """{name: rule} for {name: tensor} or {name: (shape, is_float)}: the plain entry point for callers that
    hold no tensors (the exporter, `pgolf quant --explain`)."""
    out = {}
    for name, value in shapes.items():
        if isinstance(value, tuple):
            shape, is_float = value
        else:
            shape, is_float = tuple(value.shape), bool(value.is_floating_point())
        out[name] = tensor_rule(name, shape, is_float, cfg)
    return out


def check_overrides(cfg) -> None:
    """Parse every quant.overrides item (config validation calls this, so a bad item fails early)."""
    for item in cfg.overrides:
        parse_override(item)
