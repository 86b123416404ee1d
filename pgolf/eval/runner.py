"""The one evaluation runner: every caller (a run's finish, `pgolf eval`, `pgolf bench`, `pgolf check`) describes
its passes as PassSpecs and runs them here.

A PassSpec is one scoring pass of a model over a token stream: its kind (plain: non-overlapping windows;
sliding: strided windows; ttt: score-first stream TTT, pgolf.eval.ttt; doc_ttt: per-document LoRA TTT with
phased global SGD, pgolf.eval.ttt_doc), its window (seq_len, stride), batch size, whether scoring is
document-isolated (pgolf.eval.documents), the scorer mode and compile scope (pgolf.eval.scoring: eval.compile
=false gives "eager" everywhere), and for TTT its EvalConfig. `passes_from_config` gives the passes a RunConfig
asks for; `run_pass` runs one (the legality harness calls it with per-token scores and a probe); `run_passes`
runs a list, each inside the caller's clock, and returns typed results and their receipt entries
("eval_<name>_s").
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field

from pgolf.errors import UserError
from pgolf.eval.receipts import SecondsSplit

PASS_KINDS = ("plain", "sliding", "ttt", "doc_ttt")
SUMMARY_KEYS = ("val_loss", "val_bpb", "tokens", "bytes", "nll_sum", "seconds", "compile_s")


@dataclass(frozen=True)
class PassSpec:
    name: str  # the result's name and its receipt key eval_<name>_s: plain, roundtrip, sliding, ttt
    kind: str  # one of PASS_KINDS
    seq_len: int
    stride: int = 0  # sliding: its stride; ttt: the stride of its windows (0 = seq_len)
    batch_seqs: int = 32
    doc_isolated: bool = False  # plain / sliding: document-masked attention (no context crosses a BOS)
    scorer: str = "auto"  # pgolf.eval.scoring's modes
    compile_scope: str = "model"
    eval_cfg: object = None  # the EvalConfig of a TTT pass

    @property
    def receipt_key(self) -> str:
        return f"eval_{self.name}_s"


@dataclass
class PassResult:
    name: str
    kind: str
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float  # the pass's own clock (the caller's receipt may add its setup around it)
    compile_s: float
    details: dict = field(default_factory=dict)  # what the kind adds: windows, chunks, updates, phases, ...

    def as_dict(self) -> dict:
        return {"val_loss": self.val_loss, "val_bpb": self.val_bpb, "tokens": self.tokens, "bytes": self.bytes,
                "seconds": self.seconds, "compile_s": self.compile_s, **self.details}


@dataclass
class EvalRun:
    results: dict[str, PassResult]
    timings: dict[str, float]  # {receipt key: seconds of the caller's clock around the pass}

    def as_dict(self) -> dict:
        return {name: r.as_dict() for name, r in self.results.items()}


def ttt_pass_kind(eval_cfg) -> str:
    return "doc_ttt" if eval_cfg.ttt_mode == "doc_lora" else "ttt"


def passes_from_config(cfg, final_eval: bool = True, plain_name: str = "plain", scorer: str | None = None) -> list:
    """The passes a RunConfig asks for: plain always; sliding when eval.sliding_stride > 0; TTT when eval.ttt
    (eval.ttt_mode=doc_lora: document TTT); final_eval=False: the plain pass alone."""
    from pgolf.eval.scoring import scorer_for

    e = cfg.eval
    seq_len = e.seq_len or cfg.train.seq_len
    common = {"seq_len": seq_len, "batch_seqs": e.batch_seqs, "scorer": scorer or scorer_for(e),
              "compile_scope": e.compile_scope, "doc_isolated": e.doc_isolated}
    specs = [PassSpec(plain_name, "plain", **common)]
    if final_eval and e.sliding_stride > 0:
        specs.append(PassSpec("sliding", "sliding", stride=e.sliding_stride, **common))
    if final_eval and e.ttt:
        specs.append(PassSpec("ttt", ttt_pass_kind(e), stride=e.ttt_stride or e.sliding_stride, eval_cfg=e, **common))
    return specs


def run_pass(model, tokens, lut, spec: PassSpec, rank: int = 0, world_size: int = 1, return_per_token: bool = False,
             inspect=None, log=None) -> dict:
    """One pass's full result (pgolf.eval.bpb's dict: sums, seconds, and what the kind adds); `log(line)` gets
    the document-TTT pass's progress lines."""
    from pgolf.eval.documents import doc_isolated

    if spec.kind not in PASS_KINDS:
        raise UserError(f"evaluation pass kind {spec.kind!r} is not one of {'|'.join(PASS_KINDS)}")
    kw = {"rank": rank, "world_size": world_size, "return_per_token": return_per_token, "inspect": inspect}
    if spec.kind == "plain":
        from pgolf.eval.bpb import evaluate_plain

        return evaluate_plain(doc_isolated(model, spec.doc_isolated), tokens, lut, spec.seq_len, spec.batch_seqs,
                              scorer=spec.scorer, compile_scope=spec.compile_scope, **kw)
    if spec.kind == "sliding":
        from pgolf.eval.sliding import evaluate_sliding

        return evaluate_sliding(doc_isolated(model, spec.doc_isolated), tokens, lut, spec.seq_len, spec.stride,
                                spec.batch_seqs, scorer=spec.scorer, compile_scope=spec.compile_scope, **kw)
    if spec.eval_cfg is None:
        raise UserError(f"evaluation pass {spec.name!r} ({spec.kind}) needs its EvalConfig")
    if spec.kind == "ttt":
        from pgolf.eval.ttt import evaluate_ttt

        e = dataclasses.replace(spec.eval_cfg, ttt_stride=spec.stride, batch_seqs=spec.batch_seqs,
                                compile_scope=spec.compile_scope)
        return evaluate_ttt(model, tokens, lut, e, spec.seq_len, scorer=spec.scorer, **kw)
    from pgolf.eval.ttt_doc import evaluate_doc_ttt

    return evaluate_doc_ttt(model, tokens, lut, spec.eval_cfg, spec.seq_len, scorer=spec.scorer, log=log, **kw)


def eval_log(line: str) -> None:
    """The progress lines of rank 0's passes, on stdout at once (a device log shows them live)."""
    print(line, flush=True)


def pass_result(spec: PassSpec, raw: dict) -> PassResult:
    """The typed result of a raw pass dict; the trace and per-token tensors stay out of it."""
    details = {k: v for k, v in raw.items() if k not in SUMMARY_KEYS and k != "trace" and not k.startswith("per_token")}
    details["nll_sum"] = raw["nll_sum"]
    return PassResult(spec.name, spec.kind, raw["val_loss"], raw["val_bpb"], raw["tokens"], raw["bytes"],
                      raw["seconds"], raw.get("compile_s", 0.0), details)


def run_passes(model, tokens, lut, specs: list, rank: int = 0, world_size: int = 1, phase=None,
               on_result=None, log=None) -> EvalRun:
    """Run the passes in order; `phase(name)` is the caller's clock (a context manager, e.g. a run's
    PhaseTimer.phase; none by default), entered as eval_<name> around each pass; on_result(result),
    if given, sees each result as it comes; `log(line)`, if given, a line as each pass starts and ends
    (and the document-TTT pass's progress)."""
    results, timings = {}, {}
    for spec in specs:
        clock = SecondsSplit()
        if log is not None:
            log(f"eval pass {spec.name} ({spec.kind}, {tokens.numel():,} tokens) ...")
        with clock.phase("pass"), (phase(spec.receipt_key[:-2]) if phase else contextlib.nullcontext()):
            raw = run_pass(model, tokens, lut, spec, rank, world_size, log=log)
        results[spec.name] = pass_result(spec, raw)
        timings[spec.receipt_key] = clock.elapsed("pass")
        if log is not None:
            log(f"eval pass {spec.name}: val_bpb {results[spec.name].val_bpb:.5f} in {timings[spec.receipt_key]:.1f} s")
        if on_result is not None:
            on_result(results[spec.name])
    return EvalRun(results, timings)
