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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.config import RunConfig, config_hash, validate_config
from pgolf.data.loader import train_token_stream
from pgolf.data.manifest import check_data_manifest
from pgolf.data.shards import FILE_AUDIT, list_shards
from pgolf.data.tokenizer import resolve_tokenizer_path
from pgolf.dist import (
    DistEnv,
    all_reduce_max_many,
    all_reduce_mean,
    barrier,
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
from pgolf.tensorfile import write_tensors
from pgolf.train.averaging import build_averagers, swap_in_averaged
from pgolf.train.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    mark_checkpoint_complete,
    model_tensors,
    restore_rng_state,
    save_checkpoint,
)
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


@dataclass
class TrainState:
    """What moves during the timed loop (and is saved in checkpoints)."""
    step: int = 0
    train_tokens: int = 0
    elapsed_s: float = 0.0  # timed training seconds, all-reduced MAX over ranks
    last_checkpoint_s: float = 0.0
    recurrence_on: bool = False
    qat_on: bool = False
    qat_clip_k: float = 0.0  # the SDClip k QAT trains against (set when it switches on)
    stop_reason: str = ""
    last_loss: float = float("nan")
    step_s_avg: float = 0.0  # running mean of the step time: the loop stops before a step would overrun


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
    """The module the training steps call: torch.compile'd in train.compile_mode when train.compile, else the
    model itself (the compiled module shares the model's parameters). Inductor options go to this compile
    only: the mode's own options, and triton.mix_order_reduction off unless train.mix_order_reduction."""
    if not cfg.train.compile:
        return model
    options = {}
    if cfg.train.compile_mode != "default":
        options.update(torch._inductor.list_mode_options(cfg.train.compile_mode))
    if not cfg.train.mix_order_reduction:
        options["triton.mix_order_reduction"] = False
    return torch.compile(model, options=options) if options else torch.compile(model)


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_recurrence(cfg: RunConfig) -> bool:
    return cfg.model.recur_loops > 0


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


def checkpoint_now(run_dir, state: TrainState, model, opt, loader, ema, swa, denv: DistEnv) -> None:
    averagers = {}
    if ema is not None:
        averagers.update(ema.state_tensors())
    if swa is not None:
        averagers.update(swa.state_tensors())
    scalars = {"step": state.step, "train_tokens": state.train_tokens, "elapsed_s": state.elapsed_s,
               "recurrence_on": state.recurrence_on, "qat_on": state.qat_on, "qat_clip_k": state.qat_clip_k}
    folder = save_checkpoint(run_dir, state.step, denv.rank, model, opt.state_dict(), loader.state_dict(),
                             averagers, scalars)
    barrier()
    if denv.is_main:
        mark_checkpoint_complete(folder, denv.world_size)
    barrier()


def restore_checkpoint(run_dir, state: TrainState, model, opt, loader, ema, swa, cfg: RunConfig,
                       denv: DistEnv) -> Path:
    folder = find_latest_checkpoint(run_dir)
    if folder is None:
        raise UserError(f"--resume {run_dir}: no complete checkpoint in {Path(run_dir) / 'checkpoint'}")
    tensors, meta = load_checkpoint(folder, denv.rank, denv.world_size)
    model.load_state_dict(model_tensors(tensors), strict=False)
    opt.load_state_dict(meta["optimizer"])
    loader.load_state_dict(meta["loader"])
    if ema is not None:
        ema.load_state_tensors(tensors)
    if swa is not None:
        swa.load_state_tensors(tensors)
    s = meta["scalars"]
    state.step, state.train_tokens = int(s["step"]), int(s["train_tokens"])
    state.elapsed_s = state.last_checkpoint_s = float(s["elapsed_s"])
    state.recurrence_on, state.qat_on = bool(s["recurrence_on"]), bool(s["qat_on"])
    state.qat_clip_k = float(s.get("qat_clip_k", 0.0))
    if uses_recurrence(cfg):
        model.set_recurrence(state.recurrence_on)
    set_qat_from_config(model, state.qat_on, cfg.quant, state.qat_clip_k or None)
    restore_rng_state(meta["rng"])
    return folder


def precompile_evaluation(model, cfg: RunConfig, final_eval: bool, denv: DistEnv, timer: PhaseTimer) -> dict:
    """The evaluation's graphs compiled now (pgolf.eval.warmup), timed as phase "compile_warmup_eval": the
    plain pass's always, the sliding and TTT passes' when the run ends with them (final_eval)."""
    from pgolf.eval.warmup import warm_configured_eval

    set_training_kernels(model, cfg, False)  # the graphs the evaluation will run, after training
    try:
        with timer.phase("compile_warmup_eval"):
            return warm_configured_eval(model, cfg, denv.rank, denv.world_size, final_eval)
    finally:
        set_training_kernels(model, cfg, True)


def train_run(cfg: RunConfig, resume: str | None = None, clock=None, sinks=(), final_eval: bool = True,
              code_bytes: int | None = None, overwrite: bool = False) -> dict:
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
               code_bytes: int | None, overwrite: bool, run: dict) -> dict:
    t, device, main = cfg.train, denv.device, denv.is_main
    timer = PhaseTimer(clock=clock)
    seqs_per_micro = micro_batch_seqs(cfg, denv.world_size)

    # --- run directory, fingerprint (hashing happens here, outside every timed phase)
    train_files, val_files, tokenizer_path = resolve_data_files(cfg)
    data_check = check_data_manifest(cfg.data.path, tokenizer_path)  # refuses shards of another tokenizer
    run_dir = open_run_dir(cfg, resume, denv, overwrite)
    audit = RunFileAudit(run_dir, bool(resume))
    env = env_fingerprint(train_files, val_files, tokenizer_path) if main else {}
    env["data_manifest"] = data_check
    if main and not resume:
        write_run_header(run_dir, cfg, env)
    if data_check["note"]:
        print0(f"warning: {data_check['note']}")
    writer = MetricsWriter(run_dir / "metrics.jsonl", enabled=main)
    writer.sinks.extend(sinks)
    progress = ProgressLine(enabled=main, every=t.log_every)
    record = new_record(cfg, env, run_dir)
    run.update(run_dir=run_dir, record=record, audit=audit)
    if cfg.quant.enabled:  # the script's bytes are part of the budget the quantizer fills
        code_bytes = run_code_bytes(cfg, run_dir, code_bytes, main)

    # --- model, optimizer, data
    seed_everything(t.seed)
    model = build_model(cfg, device)
    broadcast_parameters(model)
    initial_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step_model = compile_for_training(model, cfg)
    opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
    loader = train_token_stream(cfg.data.sampler, train_files, denv.rank, denv.world_size, cfg.model.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    progress.message(f"run {run_dir}  params {n_params:,}  world {denv.world_size}  device {device}  "
                     f"{seqs_per_micro} seqs x {t.seq_len} per micro-step, grad_accum {t.grad_accum}")

    # --- compile warm-up (untimed), then a full reset: it must not leak into the run
    if t.compile_warmup_steps > 0:
        with timer.phase("compile_warmup"):
            compile_warmup(step_model, model, opt, loader, cfg, device)
        model.load_state_dict(initial_weights)
        if uses_recurrence(cfg):
            model.set_recurrence(False)
        set_qat_from_config(model, False, cfg.quant)
        opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
        loader = train_token_stream(cfg.data.sampler, train_files, denv.rank, denv.world_size, cfg.model.vocab_size)
        seed_everything(t.seed)
    del initial_weights
    if cfg.eval.precompile:  # untimed too, and before any token is read: random tokens, copies of the model
        warm = precompile_evaluation(model, cfg, final_eval, denv, timer)
        progress.message(f"eval graphs compiled in {warm['seconds']:.1f} s (untimed warm-up): scoring "
                         f"{warm['scoring']}, TTT step {warm['ttt_step']}")
    ema, swa = build_averagers(model, t)
    state = TrainState()
    if resume:
        folder = restore_checkpoint(run_dir, state, model, opt, loader, ema, swa, cfg, denv)
        timer.add("train_loop", state.elapsed_s)
        writer.write("event", step=state.step, what="resume", checkpoint=str(folder))
        progress.message(f"resumed from {folder} at step {state.step} ({state.elapsed_s:.1f}s trained)")

    # --- the timed loop: step k+1 is issued before step k's loss is read (pgolf.train.pipeline)
    budget = train_budget_s(cfg)
    val_cache: dict = {}
    in_flight: IssuedStep | None = None

    def observe(issued: IssuedStep, steps_ahead: int) -> str:
        """Wait for `issued` to end, log it, and return why to stop ("" to go on): "nan", or "wallclock" when
        steps_ahead more steps (the one in flight, then the next) would end past the budget."""
        loss_value, ended_s, finite = issued.end_time(lambda: timer.elapsed("train_loop"), state.elapsed_s)
        # one MAX all-reduce a step: [elapsed, non-finite loss]
        elapsed, bad = all_reduce_max_many([ended_s, 0.0 if finite else 1.0])
        step_s = elapsed - state.elapsed_s  # from the all-reduced clock: every rank decides alike
        state.elapsed_s, state.last_loss = elapsed, loss_value
        if bad:
            writer.write("event", step=issued.step, what="nan", loss=loss_value, time_s=elapsed)
            progress.message(f"stopping: non-finite training loss ({loss_value}) at step {issued.step}")
            return "nan"
        if issued.step % max(t.log_every, 1) == 0 or issued.step == 1:
            writer.write("train", step=issued.step, time_s=elapsed, loss=all_reduce_mean(loss_value),
                         lr_scale=issued.lr_scale, tokens=issued.train_tokens,
                         tok_s=issued.train_tokens / max(elapsed, 1e-9))
        state.step_s_avg = step_s if state.step_s_avg == 0 else 0.9 * state.step_s_avg + 0.1 * step_s
        time_left = budget - elapsed if budget > 0 else None
        progress.update(issued.step, loss_value, t.batch_tokens / max(step_s, 1e-9), 1000.0 * step_s, time_left)
        return "wallclock" if budget > 0 and elapsed + steps_ahead * state.step_s_avg > budget else ""

    timer.start("train_loop")
    while True:
        scale = lr_scale(state.step, state.elapsed_s, t)
        opt.set_lr_scale(scale)
        opt.set_muon_momentum(muon_momentum_at(state.step, cfg.optim))
        if uses_recurrence(cfg) and not state.recurrence_on and progress_frac(cfg, state) >= cfg.model.recur_start_frac:
            state.recurrence_on = True
            model.set_recurrence(True)
            writer.write("event", step=state.step, what="recurrence_on", time_s=state.elapsed_s)
        if not state.qat_on and qat_due(scale, t):
            state.qat_on = True
            state.qat_clip_k = qat_clip_k(model, cfg.quant, code_bytes)
            set_qat_from_config(model, True, cfg.quant, state.qat_clip_k)
            writer.write("event", step=state.step, what="qat_on", time_s=state.elapsed_s, lr_scale=scale,
                         clip_k=state.qat_clip_k)

        loss = train_step(step_model, opt, loader, cfg, device)
        state.step += 1
        state.train_tokens += t.batch_tokens
        if ema is not None:
            ema.update(model)
        if swa is not None:
            swa.maybe_update(model, state.step, scale)
        previous, in_flight = in_flight, IssuedStep(state.step, state.train_tokens, scale, LossReadback(loss),
                                                    issued_s=timer.elapsed("train_loop"))
        if previous is not None:
            state.stop_reason = observe(previous, steps_ahead=2)  # the step just issued, then the next one
        if not state.stop_reason and state.step >= t.max_steps:
            state.stop_reason = "max_steps"
        val_due = t.val_every > 0 and state.step % t.val_every == 0 and not state.stop_reason
        checkpoint_due = (t.checkpoint_every_s > 0 and not state.stop_reason
                          and state.elapsed_s - state.last_checkpoint_s >= t.checkpoint_every_s)
        if (state.stop_reason or val_due or checkpoint_due) and state.stop_reason != "nan":
            found = observe(in_flight, steps_ahead=1)  # drained: nothing runs past state.step now
            in_flight = None
            if found == "nan" or not state.stop_reason:
                state.stop_reason = found
        if val_due and not state.stop_reason:
            with timer.paused("train_loop"):
                res = evaluate_prequant(model, cfg, val_files, tokenizer_path, denv, val_cache)
                writer.write("val", step=state.step, time_s=state.elapsed_s, val_loss=res["val_loss"],
                             val_bpb=res["val_bpb"])
                progress.message(f"step {state.step}  val_loss {res['val_loss']:.4f}  val_bpb {res['val_bpb']:.4f}")
        if state.stop_reason:
            break
        if checkpoint_due:
            with timer.paused("train_loop"):
                checkpoint_now(run_dir, state, model, opt, loader, ema, swa, denv)
                audit.save(main)  # a killed run's reads stay on record; its resume appends to them
            state.last_checkpoint_s = state.elapsed_s
    timer.stop("train_loop")
    progress.end()
    writer.write("event", step=state.step, what="stop", reason=state.stop_reason, time_s=state.elapsed_s)
    record["train"] = {
        "steps": state.step, "ms_per_step": 1000.0 * state.elapsed_s / max(state.step, 1),
        "tokens_per_s": state.train_tokens / max(state.elapsed_s, 1e-9), "train_tokens": state.train_tokens,
        "stop_reason": state.stop_reason, "params": n_params,
        "qat_clip_k": state.qat_clip_k if state.qat_on else None,
    }
    if writer.error:
        record["metrics_error"] = writer.error
    if state.stop_reason == "nan":
        record["status"] = "nan"
        record["timings"].update(timer_timings(timer))
        audit.save(main)
        if main:
            write_record(run_dir, record)
        writer.close()
        return record

    # --- averaged weights in, then calibration (timed: it counts against the wallclock budget)
    record["train"]["averaged"] = swap_in_averaged(model, ema, swa)
    set_qat_from_config(model, False, cfg.quant)
    set_training_kernels(model, cfg, False)  # the evaluated and exported model (and its copies) runs plain
    hessians = collect_calibration(model, loader, cfg, device, timer, denv)

    # --- pre-quant validation of the float model, float weights saved
    with timer.phase("eval_plain"):  # eager: compiling a second (inference) graph costs more than it saves
        res = evaluate_prequant(model, cfg, val_files, tokenizer_path, denv, val_cache)
    record["metrics"]["prequant_loss"], record["metrics"]["prequant_bpb"] = res["val_loss"], res["val_bpb"]
    writer.write("val", step=state.step, time_s=state.elapsed_s, val_loss=res["val_loss"], val_bpb=res["val_bpb"])
    progress.message(f"pre-quant  val_loss {res['val_loss']:.4f}  val_bpb {res['val_bpb']:.4f}")
    if main:
        meta = {"config_hash": config_hash(cfg), "step": state.step, "averaged": record["train"]["averaged"]}
        write_tensors(run_dir / "model.pgw", {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                                              for k, v in model.state_dict().items()}, meta)
        if hessians:
            write_tensors(run_dir / "hessians.pgw", hessians, {"batches": cfg.quant.calib_batches})
    record = finish_run(cfg, model, hessians, run_dir, env, timer, record, denv=denv,
                        val_files=val_files, tokenizer_path=tokenizer_path, val_cache=val_cache,
                        final_eval=final_eval, code_bytes=code_bytes, audit=audit)
    writer.close()
    return record


def collect_calibration(model, loader, cfg: RunConfig, device, timer: PhaseTimer, denv: DistEnv) -> dict:
    """GPTQ Hessians from fresh training batches, read inside FILE_AUDIT phase "calibration" (timed)."""
    q = cfg.quant
    if not q.enabled or q.method != "gptq" or q.calib_batches <= 0:
        return {}
    from pgolf.quant.hessian import collect_hessians

    t = cfg.train
    with timer.phase("calibration"), FILE_AUDIT.phase("calibration"):
        batches = []
        for _ in range(q.calib_batches):
            x, _ = loader.next_batch(t.batch_tokens, t.seq_len, t.grad_accum)
            batches.append(x.to(device))
        with autocast_context(device):
            hessians = collect_hessians(model, batches, passthrough_numel=q.passthrough_numel)
    # collect_hessians already summed over ranks and divided by the global token count
    return {k: v.float().cpu() for k, v in hessians.items()}
