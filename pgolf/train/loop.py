"""`train_run`: one run from config to run record, read top to bottom.

Phases: set-up (untimed) -> compile warm-up (untimed; model, optimizer and data are then reset) -> the timed
training loop (validation and checkpoints pause its clock) -> calibration (timed: it counts against the
wallclock with the loop) -> averaged weights swapped in -> pre-quant validation -> float weights saved ->
`finish_run` (quantize, evaluate, record.json).

Every decision that must agree across ranks (LR scale, recurrence, QAT, stop, checkpoint, NaN) is taken from
numbers all-reduced with MAX once a step, so every rank takes the same branch on the same step. The loop runs
one step ahead (pgolf.train.pipeline): those numbers are the last finished step's, read while the next runs.
"""

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.config import RunConfig, config_hash
from pgolf.config_rules import validate_config
from pgolf.data.loader import train_token_stream
from pgolf.data.manifest import check_data_manifest
from pgolf.data.shards import FILE_AUDIT, list_shards
from pgolf.data.tokenizer import resolve_tokenizer_path
from pgolf.dist import (
    DistEnv,
    all_reduce_max_many,
    all_reduce_mean,
    destroy_distributed,
    init_distributed,
    is_dist_active,
    print0,
)
from pgolf.errors import UserError
from pgolf.model.gpt import GPT
from pgolf.optim.builder import broadcast_parameters, build_optimizers
from pgolf.optim.schedules import lr_scale, muon_momentum_at
from pgolf.runlog import MetricsWriter, env_fingerprint, write_record, write_run_header
from pgolf.runrecord import RunRecord, TrainRecord
from pgolf.tensorfile import write_tensors
from pgolf.train.averaging import build_averagers, swap_in_averaged
from pgolf.train.calibration import collect_calibration
from pgolf.train.clock import PhaseTimer
from pgolf.train.finish import (
    RunFileAudit,
    evaluate_prequant,
    finish_run,
    new_record,
    run_code_bytes,
    save_failed_run,
    timer_timings,
)
from pgolf.train.pipeline import IssuedStep, LossReadback
from pgolf.train.progress import ProgressLine
from pgolf.train.qat import qat_clip_k, qat_due, set_qat_from_config
from pgolf.train.rundir import open_run_dir
from pgolf.train.state import Trainer, TrainState, checkpoint_now, restore_checkpoint, uses_recurrence


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data_files(cfg: RunConfig) -> tuple[list[Path], list[Path], Path]:
    """Train shards, val shards and the tokenizer of cfg.data (UserError naming what is missing)."""
    folder = Path(cfg.data.path)
    if not folder.is_dir():
        raise UserError(f"data.path={str(folder)!r} is not a folder")
    train_files = list_shards(folder, cfg.data.train_pattern)
    val_files = list_shards(folder, cfg.data.val_pattern)
    return train_files, val_files, resolve_tokenizer_path(cfg.data)


def build_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """The model on its device (fp32 weights; bf16 comes from autocast on CUDA), with the training steps'
    own kernels on (train.fp8, model.fused_qk, model.fused_ce; set_training_kernels)."""
    model = GPT(cfg.model).to(device)
    set_training_kernels(model, cfg, True)
    return model


def set_training_kernels(model, cfg: RunConfig, on: bool) -> None:
    """The configured training-only kernels on, or every one off (the evaluated and exported model)."""
    model.set_training_kernels(fp8=on and cfg.train.fp8, fused_qk=on and cfg.model.fused_qk,
                               fused_ce=on and cfg.model.fused_ce)


def compile_for_training(model: torch.nn.Module, cfg: RunConfig):
    """What the training steps call: the model torch.compile'd in train.compile_mode when train.compile, else
    the model itself (the compiled module shares the model's parameters). train.compile_scope="blocks"
    compiles the blocks only (pgolf.eval.scoring.compile_blocks_only). Inductor options go to this compile
    only: the mode's own options, and triton.mix_order_reduction off unless train.mix_order_reduction."""
    if not cfg.train.compile:
        return model
    options = {}
    if cfg.train.compile_mode != "default":
        options.update(torch._inductor.list_mode_options(cfg.train.compile_mode))
    if not cfg.train.mix_order_reduction:
        options["triton.mix_order_reduction"] = False
    if cfg.train.compile_scope == "blocks":
        from pgolf.eval.scoring import compile_blocks_only

        step = compile_blocks_only(call_model, options)
        return lambda *args, **kwargs: step(model, *args, **kwargs)
    return torch.compile(model, options=options) if options else torch.compile(model)


def call_model(model, *args, **kwargs):
    """model(*args, **kwargs): the function train.compile_scope="blocks" runs with its blocks compiled."""
    return model(*args, **kwargs)


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_budget_s(cfg: RunConfig) -> float:
    """Seconds of timed training before the stop (0 = no wallclock cap)."""
    t = cfg.train
    return max(t.wallclock_s - t.calib_reserve_s, 0.0) if t.wallclock_s > 0 else 0.0


def progress_frac(cfg: RunConfig, state: TrainState) -> float:
    """Share of the run done: of the time budget with a cap, of max_steps without."""
    budget = train_budget_s(cfg)
    if budget > 0:
        return state.elapsed_s / budget
    return state.step / max(cfg.train.max_steps, 1)


def micro_batch_seqs(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    per_micro = t.batch_tokens // (world_size * t.grad_accum)
    if t.batch_tokens % (world_size * t.grad_accum * t.seq_len):
        raise UserError(f"train.batch_tokens={t.batch_tokens} does not split into {world_size} ranks x "
                        f"{t.grad_accum} micro-steps of whole {t.seq_len}-token sequences")
    return per_micro // t.seq_len


def train_step(step_model, opt, loader, cfg: RunConfig, device: torch.device) -> torch.Tensor:
    """One optimizer step of grad_accum micro-steps; returns this rank's mean loss (a 0-dim tensor)."""
    t = cfg.train
    total = torch.zeros((), device=device)
    for _ in range(t.grad_accum):
        with FILE_AUDIT.phase("train"):  # train.doc_mask: (x, y, doc_ids)
            fetch = loader.next_doc_batch if t.doc_mask else loader.next_batch
            batch = fetch(t.batch_tokens, t.seq_len, t.grad_accum)
        if device.type == "cuda":  # a copy from pageable memory would wait for the GPU's queue to drain
            batch = [b.pin_memory() for b in batch]
        x, y, *doc_ids = [b.to(device, non_blocking=True) for b in batch]
        with autocast_context(device):
            loss = step_model(x, y, doc_ids=doc_ids[0]) if doc_ids else step_model(x, y)
        (loss / t.grad_accum).backward()
        total += loss.detach().float()
    opt.step(cfg.optim.grad_clip)
    opt.zero_grad()
    return total / t.grad_accum


def compile_warmup(step_model, model, opt, loader, cfg: RunConfig, device: torch.device) -> None:
    """Real steps that prime compilation of every graph the timed loop will run (recurrence, QAT)."""
    n = cfg.train.compile_warmup_steps
    for i in range(n):
        if uses_recurrence(cfg):
            model.set_recurrence(i >= n // 2)
        set_qat_from_config(model, cfg.train.qat_start_scale > 0 and i == n - 1, cfg.quant)
        train_step(step_model, opt, loader, cfg, device)


def precompile_evaluation(model, cfg: RunConfig, final_eval: bool, denv: DistEnv, timer: PhaseTimer) -> dict:
    """The evaluation's graphs compiled now (pgolf.eval.warmup), timed as phase "compile_warmup_eval": the
    plain pass's always, the sliding and TTT passes' when the run ends with them (final_eval). The model runs
    as the evaluation will, then is set back: training-only kernels off, depth recurrence on where the config
    loops (training ends with the loops on, as `pgolf eval` assumes). Dynamo guards on recurrence_active: the
    loop-less graphs of the reset model left the pre-quant pass a cold compile (49 s on an H100)."""
    from pgolf.eval.warmup import warm_configured_eval

    set_training_kernels(model, cfg, False)  # the graphs the evaluation will run, after training
    looping = model.recurrence_active
    model.set_recurrence(uses_recurrence(cfg))
    try:
        with timer.phase("compile_warmup_eval"):
            return warm_configured_eval(model, cfg, denv.rank, denv.world_size, final_eval)
    finally:
        model.set_recurrence(looping)
        set_training_kernels(model, cfg, True)


@dataclass
class RunSetup:
    """What every phase of a run reads once its directory exists: the config and the ranks, the phase timer,
    the run directory with its writers and record, the data files, the script's bytes, the cached val data."""
    cfg: RunConfig
    denv: DistEnv
    timer: PhaseTimer
    run_dir: Path
    audit: RunFileAudit
    env: dict
    writer: MetricsWriter
    progress: ProgressLine
    record: RunRecord
    train_files: list
    val_files: list
    tokenizer_path: Path
    code_bytes: int | None = None
    val_cache: dict = field(default_factory=dict)


def train_run(cfg: RunConfig, resume: str | None = None, clock=None, sinks=(), final_eval: bool = True,
              code_bytes: int | None = None, overwrite: bool = False) -> RunRecord:
    """Train one run and write its run directory; returns the run record (status "ok" or "nan").

    `clock` replaces time.perf_counter (tests); `sinks` get every metrics line; final_eval=False skips the
    sliding-window and TTT evaluations; code_bytes is the submission script's size when the exported
    script runs itself (None: generate the script into the run directory when pgolf.export is there);
    overwrite lets a new run (or a resume) replace a finished run of the same name. When the run fails
    after its directory exists, record.json says so (status "failed", the error) before the error goes on."""
    validate_config(cfg)
    owned = not is_dist_active()
    denv = init_distributed(cfg.train.device)
    run: dict = {}  # run_dir, record and audit once they exist, for the failure record
    try:
        return _train_run(cfg, resume, denv, clock or time.perf_counter, sinks, final_eval, code_bytes,
                          overwrite, run)
    except (Exception, KeyboardInterrupt) as e:
        if "record" in run and denv.is_main:
            save_failed_run(run["run_dir"], run["record"], run["audit"], e)
        raise
    finally:
        if owned:
            destroy_distributed()


def _train_run(cfg: RunConfig, resume: str | None, denv: DistEnv, clock, sinks, final_eval: bool,
               code_bytes: int | None, overwrite: bool, run: dict) -> RunRecord:
    """The phases of train_run in order; `run` gets the run directory, record and audit once they exist."""
    setup = open_run(cfg, resume, denv, PhaseTimer(clock=clock), sinks, overwrite)
    run.update(run_dir=setup.run_dir, record=setup.record, audit=setup.audit)
    setup.code_bytes = code_bytes
    if cfg.quant.enabled:  # the script's bytes are part of the budget the quantizer fills
        setup.code_bytes = run_code_bytes(cfg, setup.run_dir, code_bytes, denv.is_main)
    parts = build_trainer(setup)
    if cfg.eval.precompile:  # untimed too, and before any token is read: random tokens, copies of the model
        warm = precompile_evaluation(parts.model, cfg, final_eval, denv, setup.timer)
        setup.progress.message(f"eval graphs compiled in {warm['seconds']:.1f} s (untimed warm-up): scoring "
                               f"{warm['scoring']}, TTT step {warm['ttt_step']}")
    parts.ema, parts.swa = build_averagers(parts.model, cfg.train)
    state = TrainState()
    if resume:
        resume_run(setup, parts, state)
    TimedLoop(setup, parts, state).run()
    record_training(setup, parts, state)
    if state.stop_reason == "nan":
        return end_nan_run(setup)
    return finish_trained_run(setup, parts, state, final_eval)


def open_run(cfg: RunConfig, resume: str | None, denv: DistEnv, timer: PhaseTimer, sinks,
             overwrite: bool) -> RunSetup:
    """The run directory, its fingerprint (hashing happens here, outside every timed phase), the metrics
    writer, the progress line and a new run record."""
    micro_batch_seqs(cfg, denv.world_size)  # a batch that does not split is refused before anything is written
    train_files, val_files, tokenizer_path = resolve_data_files(cfg)
    data_check = check_data_manifest(cfg.data.path, tokenizer_path)  # refuses shards of another tokenizer
    run_dir = open_run_dir(cfg, resume, denv, overwrite)
    audit = RunFileAudit(run_dir, bool(resume))
    env = env_fingerprint(train_files, val_files, tokenizer_path) if denv.is_main else {}
    env["data_manifest"] = data_check
    if denv.is_main and not resume:
        write_run_header(run_dir, cfg, env)
    if data_check["note"]:
        print0(f"warning: {data_check['note']}")
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=denv.is_main)
    writer.sinks.extend(sinks)
    progress = ProgressLine(enabled=denv.is_main, every=cfg.train.log_every)
    return RunSetup(cfg, denv, timer, run_dir, audit, env, writer, progress, new_record(cfg, env, run_dir),
                    train_files, val_files, tokenizer_path)


def train_stream(setup: RunSetup):
    """The training token stream of data.sampler (sequential or coprime)."""
    return train_token_stream(setup.cfg.data.sampler, setup.train_files, setup.denv.rank, setup.denv.world_size,
                              setup.cfg.model.vocab_size)


def build_trainer(setup: RunSetup) -> Trainer:
    """Model, optimizers and data, seeded. The compile warm-up (untimed) runs here, and then all three are
    reset to where they started: it must not leak into the run."""
    cfg, denv, t = setup.cfg, setup.denv, setup.cfg.train
    seed_everything(t.seed)
    model = build_model(cfg, denv.device)
    broadcast_parameters(model)
    initial_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step_model = compile_for_training(model, cfg)
    opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
    parts = Trainer(model, step_model, opt, train_stream(setup), sum(p.numel() for p in model.parameters()))
    setup.progress.message(f"run {setup.run_dir}  params {parts.n_params:,}  world {denv.world_size}  device "
                           f"{denv.device}  {micro_batch_seqs(cfg, denv.world_size)} seqs x {t.seq_len} per "
                           f"micro-step, grad_accum {t.grad_accum}")
    if t.compile_warmup_steps > 0:
        with setup.timer.phase("compile_warmup"):
            compile_warmup(step_model, model, opt, parts.loader, cfg, denv.device)
        setup.progress.message(f"compile warm-up: {t.compile_warmup_steps} steps in "
                               f"{setup.timer.elapsed('compile_warmup'):.1f} s (untimed; train.compile_scope="
                               f"{t.compile_scope})")
        model.load_state_dict(initial_weights)
        if uses_recurrence(cfg):
            model.set_recurrence(False)
        set_qat_from_config(model, False, cfg.quant)
        parts.opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
        parts.loader = train_stream(setup)
        seed_everything(t.seed)
    return parts


def resume_run(setup: RunSetup, parts: Trainer, state: TrainState) -> None:
    """The latest checkpoint into parts and state; the timer takes the seconds it had trained."""
    folder = restore_checkpoint(setup.run_dir, state, parts, setup.cfg, setup.denv)
    setup.timer.add("train_loop", state.elapsed_s)
    setup.writer.write("event", step=state.step, what="resume", checkpoint=str(folder))
    setup.progress.message(f"resumed from {folder} at step {state.step} ({state.elapsed_s:.1f}s trained)")


class TimedLoop:
    """The timed loop: step k+1 is issued before step k's loss is read (pgolf.train.pipeline); validation and
    checkpoints drain the step in flight and pause the clock."""

    def __init__(self, setup: RunSetup, parts: Trainer, state: TrainState):
        self.setup, self.parts, self.state = setup, parts, state
        self.cfg, self.t = setup.cfg, setup.cfg.train
        self.budget = train_budget_s(setup.cfg)
        self.in_flight: IssuedStep | None = None

    def run(self) -> None:
        s, state = self.setup, self.state
        s.timer.start("train_loop")
        while True:
            self.issue_step(self.apply_schedules())
            val_due, checkpoint_due = self.pauses_due()
            if val_due and not state.stop_reason:
                self.validate()
            if state.stop_reason:
                break
            if checkpoint_due:
                self.checkpoint()
        s.timer.stop("train_loop")
        s.progress.end()
        s.writer.write("event", step=state.step, what="stop", reason=state.stop_reason, time_s=state.elapsed_s)

    def apply_schedules(self) -> float:
        """LR scale and Muon momentum of the step about to run; recurrence and late QAT on once due."""
        cfg, state, model, writer = self.cfg, self.state, self.parts.model, self.setup.writer
        scale = lr_scale(state.step, state.elapsed_s, self.t)
        self.parts.opt.set_lr_scale(scale)
        self.parts.opt.set_muon_momentum(muon_momentum_at(state.step, cfg.optim))
        if uses_recurrence(cfg) and not state.recurrence_on and progress_frac(cfg, state) >= cfg.model.recur_start_frac:
            state.recurrence_on = True
            model.set_recurrence(True)
            writer.write("event", step=state.step, what="recurrence_on", time_s=state.elapsed_s)
        if not state.qat_on and qat_due(scale, self.t):
            state.qat_on = True
            state.qat_clip_k = qat_clip_k(model, cfg.quant, self.setup.code_bytes)
            set_qat_from_config(model, True, cfg.quant, state.qat_clip_k)
            writer.write("event", step=state.step, what="qat_on", time_s=state.elapsed_s, lr_scale=scale,
                         clip_k=state.qat_clip_k)
        return scale

    def issue_step(self, scale: float) -> None:
        """One step issued; the one before it observed while this one runs; stop_reason set when due."""
        p, state = self.parts, self.state
        loss = train_step(p.step_model, p.opt, p.loader, self.cfg, self.setup.denv.device)
        state.step += 1
        state.train_tokens += self.t.batch_tokens
        if p.ema is not None:
            p.ema.update(p.model)
        if p.swa is not None:
            p.swa.maybe_update(p.model, state.step, scale)
        previous, self.in_flight = self.in_flight, IssuedStep(state.step, state.train_tokens, scale,
                                                              LossReadback(loss),
                                                              issued_s=self.setup.timer.elapsed("train_loop"))
        if previous is not None:
            state.stop_reason = self.observe(previous, steps_ahead=2)  # the step just issued, then the next one
        if not state.stop_reason and state.step >= self.t.max_steps:
            state.stop_reason = "max_steps"

    def pauses_due(self) -> tuple[bool, bool]:
        """(validation due, checkpoint due) now; before either, or a stop other than "nan", the step in flight
        is drained: nothing runs past state.step then (and it may itself find a stop)."""
        state, t = self.state, self.t
        val_due = t.val_every > 0 and state.step % t.val_every == 0 and not state.stop_reason
        checkpoint_due = (t.checkpoint_every_s > 0 and not state.stop_reason
                          and state.elapsed_s - state.last_checkpoint_s >= t.checkpoint_every_s)
        if (state.stop_reason or val_due or checkpoint_due) and state.stop_reason != "nan":
            found = self.observe(self.in_flight, steps_ahead=1)
            self.in_flight = None
            if found == "nan" or not state.stop_reason:
                state.stop_reason = found
        return val_due, checkpoint_due

    def observe(self, issued: IssuedStep, steps_ahead: int) -> str:
        """Wait for `issued` to end, log it, and return why to stop ("" to go on): "nan", or "wallclock" when
        steps_ahead more steps (the one in flight, then the next) would end past the budget."""
        s, state, t, budget = self.setup, self.state, self.t, self.budget
        loss_value, ended_s, finite = issued.end_time(lambda: s.timer.elapsed("train_loop"), state.elapsed_s)
        # one MAX all-reduce a step: [elapsed, non-finite loss]
        elapsed, bad = all_reduce_max_many([ended_s, 0.0 if finite else 1.0])
        step_s = elapsed - state.elapsed_s  # from the all-reduced clock: every rank decides alike
        state.elapsed_s, state.last_loss = elapsed, loss_value
        if bad:
            s.writer.write("event", step=issued.step, what="nan", loss=loss_value, time_s=elapsed)
            s.progress.message(f"stopping: non-finite training loss ({loss_value}) at step {issued.step}")
            return "nan"
        if issued.step % max(t.log_every, 1) == 0 or issued.step == 1:
            s.writer.write("train", step=issued.step, time_s=elapsed, loss=all_reduce_mean(loss_value),
                           lr_scale=issued.lr_scale, tokens=issued.train_tokens,
                           tok_s=issued.train_tokens / max(elapsed, 1e-9))
        state.step_s_avg = step_s if state.step_s_avg == 0 else 0.9 * state.step_s_avg + 0.1 * step_s
        time_left = budget - elapsed if budget > 0 else None
        s.progress.update(issued.step, loss_value, t.batch_tokens / max(step_s, 1e-9), 1000.0 * step_s, time_left)
        return "wallclock" if budget > 0 and elapsed + steps_ahead * state.step_s_avg > budget else ""

    def validate(self) -> None:
        s, state = self.setup, self.state
        with s.timer.paused("train_loop"):
            res = evaluate_prequant(self.parts.model, s.cfg, s.val_files, s.tokenizer_path, s.denv, s.val_cache)
            s.writer.write("val", step=state.step, time_s=state.elapsed_s, val_loss=res["val_loss"],
                           val_bpb=res["val_bpb"])
            s.progress.message(f"step {state.step}  val_loss {res['val_loss']:.4f}  val_bpb {res['val_bpb']:.4f}")

    def checkpoint(self) -> None:
        s, state = self.setup, self.state
        with s.timer.paused("train_loop"):
            checkpoint_now(s.run_dir, state, self.parts, s.denv)
            s.audit.save(s.denv.is_main)  # a killed run's reads stay on record; its resume appends to them
        state.last_checkpoint_s = state.elapsed_s


def record_training(setup: RunSetup, parts: Trainer, state: TrainState) -> None:
    """The timed loop's figures into the run record (and the metrics file's error, if it had one)."""
    setup.record.train = TrainRecord(
        steps=state.step, ms_per_step=1000.0 * state.elapsed_s / max(state.step, 1),
        tokens_per_s=state.train_tokens / max(state.elapsed_s, 1e-9), train_tokens=state.train_tokens,
        stop_reason=state.stop_reason, params=parts.n_params, qat_clip_k=state.qat_clip_k if state.qat_on else None)
    if setup.writer.error:
        setup.record.metrics_error = setup.writer.error


def end_nan_run(setup: RunSetup) -> RunRecord:
    """A run stopped by a non-finite loss: its record (status "nan") and file audit written, nothing after."""
    record = setup.record
    record.status = "nan"
    record.timings.update(timer_timings(setup.timer))
    setup.audit.save(setup.denv.is_main)
    if setup.denv.is_main:
        write_record(setup.run_dir, record)
    setup.writer.close()
    return record


def finish_trained_run(setup: RunSetup, parts: Trainer, state: TrainState, final_eval: bool) -> RunRecord:
    """Averaged weights in, calibration (timed: it counts against the wallclock budget), pre-quant validation
    of the float model, float weights saved, then finish_run (quantize, evaluate, record.json)."""
    cfg, model, record, denv = setup.cfg, parts.model, setup.record, setup.denv
    record.train.averaged = swap_in_averaged(model, parts.ema, parts.swa)
    set_qat_from_config(model, False, cfg.quant)
    set_training_kernels(model, cfg, False)  # the evaluated and exported model (and its copies) runs plain
    hessians = collect_calibration(model, parts.loader, cfg, denv.device, setup.timer, denv)
    with setup.timer.phase("eval_plain"):  # eager: compiling a second (inference) graph costs more than it saves
        res = evaluate_prequant(model, cfg, setup.val_files, setup.tokenizer_path, denv, setup.val_cache)
    record.metrics.prequant_loss, record.metrics.prequant_bpb = res["val_loss"], res["val_bpb"]
    setup.writer.write("val", step=state.step, time_s=state.elapsed_s, val_loss=res["val_loss"],
                       val_bpb=res["val_bpb"])
    setup.progress.message(f"pre-quant  val_loss {res['val_loss']:.4f}  val_bpb {res['val_bpb']:.4f}")
    if denv.is_main:
        save_float_weights(setup, model, state, hessians)
    record = finish_run(cfg, model, hessians, setup.run_dir, setup.env, setup.timer, record, denv=denv,
                        val_files=setup.val_files, tokenizer_path=setup.tokenizer_path, val_cache=setup.val_cache,
                        final_eval=final_eval, code_bytes=setup.code_bytes, audit=setup.audit)
    setup.writer.close()
    return record


def save_float_weights(setup: RunSetup, model, state: TrainState, hessians: dict) -> None:
    """model.pgw (the float weights, fp32 on the CPU) and, with GPTQ, hessians.pgw in the run directory."""
    meta = {"config_hash": config_hash(setup.cfg), "step": state.step, "averaged": setup.record.train.averaged}
    write_tensors(setup.run_dir / "model.pgw", {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                                                for k, v in model.state_dict().items()}, meta)
    if hessians:
        q = setup.cfg.quant
        write_tensors(setup.run_dir / "hessians.pgw", hessians, {"batches": q.calib_batches, "source": q.calib_source})
