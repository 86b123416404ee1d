"""GPTQ calibration at the end of training, inside the timed budget: the Hessians of fresh training batches or
of sequences the model samples itself (quant.calib_source)."""

from pgolf.config import RunConfig
from pgolf.data.shards import FILE_AUDIT
from pgolf.dist import DistEnv
from pgolf.eval.scoring import eval_autocast
from pgolf.train.clock import PhaseTimer

# quant.calib_source=self: rank r samples with seed train.seed + CALIB_SEED_STRIDE * r (distinct per rank)
CALIB_SEED_STRIDE = 7919


def collect_calibration(model, loader, cfg: RunConfig, device, timer: PhaseTimer, denv: DistEnv) -> dict:
    """GPTQ Hessians from fresh training batches, read inside FILE_AUDIT phase "calibration", or from sequences
    the model samples itself (quant.calib_source=self); timed either way."""
    q = cfg.quant
    if not q.enabled or q.method != "gptq" or q.calib_batches <= 0:
        return {}
    from pgolf.quant.hessian import collect_hessians, generate_calibration

    t = cfg.train
    with timer.phase("calibration"), FILE_AUDIT.phase("calibration"):
        if q.calib_source == "self":
            with eval_autocast(device):
                batches = generate_calibration(model, q.calib_batches, q.calib_seqs, t.seq_len, q.calib_temperature,
                                               t.seed + CALIB_SEED_STRIDE * denv.rank)
        else:
            batches = [loader.next_batch(t.batch_tokens, t.seq_len, t.grad_accum)[0].to(device)
                       for _ in range(q.calib_batches)]
        with eval_autocast(device):
            hessians = collect_hessians(model, batches, passthrough_numel=q.passthrough_numel)
    # collect_hessians already summed over ranks and divided by the global token count
    return {k: v.float().cpu() for k, v in hessians.items()}
