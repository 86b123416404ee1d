"""The pgolf GPT: every technique of the record stack is one flag of ModelConfig.

Depth recurrence and the U-Net skips: the blocks run in a "virtual" order, physical layers
0..L-1 with the span recur_first..recur_last repeated recur_loops extra times while recurrence is on.
The first half of the virtual sequence (rounded down) is the encoder and pushes its outputs; the rest is
the decoder and pops them in reverse, decoder position j using skip weight (and gate) j. The number of skip
weights is that of the longest sequence (recurrence on); with recurrence off the first ones are used.
A looped block keeps its physical ln_scale factor, XSA and value-embedding setting.

Two-lane parallel residuals (model.parallel_lanes_from, frontier.md §3.3): from the first virtual position
whose physical layer is a lane block on, the stream is a pair (lane0, lane1), both starting as the stream;
a decoder skip merges into lane 0, each lane block reads attention from lane 0 (mixed with x0) and the MLP
from lane 1 and writes both lanes through its own learned factors; after the last block the hidden state
is the lanes' mean. Lane blocks must form the tail of the virtual order, inside the decoder.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config import ModelConfig
from pgolf.errors import UserError
from pgolf.model.attention import CausalSelfAttention
from pgolf.model.features import BigramHash, SmearGate, SmearGateV2, ValueEmbedding
from pgolf.model.fused_ce import softcapped_cross_entropy
from pgolf.model.layers import CastedLinear, RMSNorm, Rotary, softcap_logits


def leaky_relu_squared(h: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(slope)(h)^2 with the slope a 0-dim tensor: a compiled graph takes it as an input, so one
    compile serves every slope (F.leaky_relu takes a Python float, which compile bakes in as a constant).
    Equal to F.leaky_relu(h, float(slope)).square() bit for bit; 0 is exactly relu^2."""
    return torch.where(h > 0, h, h * slope).square()


class BlockMLP(nn.Module):
    """proj(LeakyReLU(slope)(fc(x))^2). The slope is a buffer read at every call (set_slope changes it in place,
    also under torch.compile, without recompiling); it is not saved: the config holds it."""

    def __init__(self, dim: int, hidden: int, slope: float):
        super().__init__()
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim)
        self.register_buffer("slope", torch.tensor(float(slope)), persistent=False)

    def set_slope(self, slope: float) -> None:
        self.slope.fill_(float(slope))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(leaky_relu_squared(self.fc(x), self.slope))


class Block(nn.Module):
    """One transformer block with x0 re-injection (resid_mix), per-dim output scales and optional parallel residual."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.layer = layer
        self.norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_gain_init, cfg.attention,
                                        xsa=layer >= cfg.num_layers - cfg.xsa_last_n, native_gqa=cfg.native_gqa,
                                        gate_window=cfg.gate_window if cfg.sparse_attn_gate else 0,
                                        gate_scale=cfg.sparse_attn_gate_scale)
        self.mlp = BlockMLP(dim, round(cfg.mlp_mult * dim), cfg.mlp_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # a tensor, not a Python float: a compiled block then takes it as an input, so that one compile serves
        # every layer (pgolf.eval.scoring's block-wise compile); not saved, the config holds it
        factor = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.register_buffer("ln_factor", torch.tensor(factor), persistent=False)
        self.parallel = 0 <= cfg.parallel_resid_from <= layer
        self.lanes = 0 <= cfg.parallel_lanes_from <= layer
        if self.lanes:  # lane_resid[k]: lane k's carry; lane_post[s, k]: source s (0 attn, 1 MLP) into lane k
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        # the product in float32, rounded once to the stream's dtype: what a Python float factor does, on
        # every device (a CUDA kernel would otherwise round the factor to bf16 first)
        n = self.norm(x)
        return (n.float() * self.ln_factor.float()).to(n.dtype)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ve: torch.Tensor | None = None, keep: int | None = None, doc_mask=None, cache=None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with `keep`, the output of the last `keep` positions only (B, keep, D): the
        attention's keys and values come from every position, everything else runs on those alone.
        doc_mask: the document mask of GPT.forward_hidden's doc_ids, for the attention; cache: this virtual
        layer's pgolf.model.kv_cache.LayerKV (x holds new positions only).
        A lane block (model.parallel_lanes_from) takes and returns the pair of lanes instead (forward_lanes)."""
        if self.lanes:
            return self.forward_lanes(x, x0, cos, sin, ve, keep, doc_mask, cache)
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = self.normed(x)
        attn_out = self.attn(n, cos, sin, ve, keep, doc_mask, cache)
        if keep is not None:
            x, n = x[:, -keep:], n[:, -keep:]
        if self.parallel:
            return x + self.attn_scale.to(x.dtype) * attn_out + self.mlp_scale.to(x.dtype) * self.mlp(n)
        x = x + self.attn_scale.to(x.dtype) * attn_out
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.normed(x))

    def forward_lanes(self, lanes: tuple, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      ve: torch.Tensor | None = None, keep: int | None = None, doc_mask=None, cache=None) -> tuple:
        """The two-lane block: a = attention(norm(mix(lane0, x0))), m = MLP(norm(lane1)), independent of
        each other; lane k <- lane_resid[k] * lane k + lane_post[0, k] * a + lane_post[1, k] * m. resid_mix
        shapes the attention's read only; lane 0 itself is not replaced by the mix."""
        lane0, lane1 = lanes
        mix = self.resid_mix.to(lane0.dtype)
        attn_out = self.attn(self.normed(mix[0] * lane0 + mix[1] * x0), cos, sin, ve, keep, doc_mask, cache)
        if keep is not None:
            lane0, lane1 = lane0[:, -keep:], lane1[:, -keep:]
        a = self.attn_scale.to(lane0.dtype) * attn_out
        m = self.mlp_scale.to(lane1.dtype) * self.mlp(self.normed(lane1))
        r, p = self.lane_resid.to(lane0.dtype), self.lane_post.to(lane0.dtype)
        return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m


def virtual_layer_order(cfg: ModelConfig, recurrence: bool) -> list[int]:
    """Physical layer indices in the order they run: the recurrence span repeated when recurrence is on."""
    layers = list(range(cfg.num_layers))
    if not recurrence or cfg.recur_loops <= 0:
        return layers
    span = layers[cfg.recur_first: cfg.recur_last + 1]
    return layers[: cfg.recur_first] + span * (1 + cfg.recur_loops) + layers[cfg.recur_last + 1:]


def check_lane_layers(cfg: ModelConfig) -> None:
    """Lane blocks (model.parallel_lanes_from) must be the tail of the virtual order, with recurrence on and
    off, and lie in the decoder when there are U-Net skips (the encoder pushes one stream, not two)."""
    if cfg.parallel_lanes_from < 0:
        return
    for recurrence in (False, True):
        order = virtual_layer_order(cfg, recurrence)
        is_lane = [layer >= cfg.parallel_lanes_from for layer in order]
        first = is_lane.index(True)
        encoder = len(order) // 2 if cfg.unet_skips else 0
        if not all(is_lane[first:]) or first < encoder:
            raise UserError(f"model.parallel_lanes_from={cfg.parallel_lanes_from}: the lane blocks must run last "
                            f"and in the decoder, but the virtual order is {order} with {encoder} encoder layers")


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.model_dim
        head_dim = dim // cfg.num_heads
        kv_dim = cfg.num_kv_heads * head_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, dim)
        self.bigram = (BigramHash(cfg.bigram_buckets, cfg.bigram_dim, dim, cfg.bos_mask)
                       if cfg.bigram_buckets > 0 else None)
        self.smear = SmearGate(dim, cfg.bos_mask) if cfg.smear_gate else None
        self.smear_v2 = SmearGateV2(cfg.gate_window, cfg.bos_mask) if cfg.smear_gate_v2 else None
        check_lane_layers(cfg)
        self.input_norm = RMSNorm()
        self.value_embed = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, kv_dim) if cfg.ve_last_n > 0 else None
        self.ve_layer_scales = nn.Parameter(torch.ones(cfg.ve_last_n)) if cfg.ve_last_n > 0 else None
        self.ve_first_layer = cfg.num_layers - cfg.ve_last_n
        self.rotary = Rotary(head_dim, cfg.rope_dims, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.recurrence_active = False
        self.block_call = None  # see routed_blocks
        self.residual_dtype = getattr(torch, cfg.residual_dtype)
        num_skips = len(virtual_layer_order(cfg, recurrence=True)) // 2 if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim)) if num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim)) if num_skips and cfg.skip_gates else None
        self.final_norm = RMSNorm()
        self.head = None if cfg.tie_embeddings else CastedLinear(dim, cfg.vocab_size)
        self.fused_ce = False  # the training loss through pgolf.model.fused_ce (set_training_kernels)
        self.init_weights()
        if cfg.embed_param_dtype != "float32":  # model.embed_param_dtype: the seeds' bf16 master tables
            for table in self.embedding_tables():
                table.to(getattr(torch, cfg.embed_param_dtype))

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialization in one place (see the module docstring of each feature for its reasons)."""
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std if cfg.tie_embeddings else 1.0)
        for block in self.blocks:
            self.init_frontier_block(block)
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                self.init_matrix(lin)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
            block.attn.q_gain.fill_(cfg.qk_gain_init)
            block.attn_scale.fill_(1.0)
            block.mlp_scale.fill_(1.0)
            block.resid_mix[0].fill_(1.0)
            block.resid_mix[1].fill_(0.0)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
            self.init_aux_projection(self.bigram.proj, is_bigram=True)
            self.bigram.scale.fill_(0.05)
        if self.value_embed is not None:
            nn.init.normal_(self.value_embed.embed.weight, std=0.01)
            self.init_aux_projection(self.value_embed.proj, is_bigram=False)
            self.value_embed.scale.fill_(0.1)
            self.ve_layer_scales.fill_(1.0)
        if self.smear is not None:
            self.smear.gate.zero_()
        if self.smear_v2 is not None:
            self.smear_v2.weight.zero_()
            self.smear_v2.lam.zero_()
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        if self.skip_gates is not None:
            self.skip_gates.zero_()
        if self.head is not None:
            nn.init.zeros_(self.head.weight)

    @staticmethod
    @torch.no_grad()
    def init_frontier_block(block: Block) -> None:
        """The frontier's per-block parameters, where on: sparse gate 0 (g = 0.5), lane carries 1.1, routes 1."""
        if block.attn.attn_gate_w is not None:
            block.attn.attn_gate_w.zero_()
        if block.lanes:
            block.lane_resid.fill_(1.1)
            block.lane_post.fill_(1.0)

    @torch.no_grad()
    def init_aux_projection(self, proj: nn.Linear, is_bigram: bool) -> None:
        """A bigram or VE projection by model.aux_proj_init: `pgolf` gives the bigram projection the block
        matrices' init and zeroes the VE projection; `ortho` makes both orthogonal (#1176), `ortho_scaled`
        orthogonal times 1/sqrt(2 * num_layers) (#535, #493, whose init scales every name ending ".proj")."""
        mode = self.cfg.aux_proj_init
        if mode == "pgolf":
            if is_bigram:
                self.init_matrix(proj)
            else:
                nn.init.zeros_(proj.weight)
            return
        nn.init.orthogonal_(proj.weight)
        if mode == "ortho_scaled":
            proj.weight.mul_(1.0 / math.sqrt(2 * self.cfg.num_layers))

    def features(self) -> list[nn.Module]:
        """The BigramHash and value-embedding modules that are on."""
        return [f for f in (self.bigram, self.value_embed) if f is not None]

    def embedding_tables(self) -> list[nn.Embedding]:
        """The token, bigram and value-embedding tables (model.embed_param_dtype sets their dtype)."""
        return [self.tok_emb] + [f.embed for f in self.features()]

    def aux_projection_weights(self) -> list[nn.Parameter]:
        """The bigram and VE projections: Muon's by default, the scalar AdamW's with optim.aux_proj_group=scalar."""
        return [f.proj.weight for f in self.features()]

    def init_matrix(self, lin: nn.Linear) -> None:
        if self.cfg.ortho_init:
            nn.init.orthogonal_(lin.weight)
        else:
            lin.reset_parameters()

    def set_recurrence(self, active: bool) -> None:
        """Switch depth recurrence on or off (a compiled model recompiles once for each setting)."""
        self.recurrence_active = bool(active)

    def set_qat(self, active: bool, bits: int | None = None, clip_k: float | None = None) -> None:
        """Fake-quantize the block matrices (attention and MLP) in the forward pass; bits/clip_k if given."""
        for module in self.blocks.modules():
            if isinstance(module, CastedLinear):
                module.configure_qat(active, bits, clip_k)

    def set_training_kernels(self, fp8: bool, fused_qk: bool, fused_ce: bool = False) -> None:
        """Switch the fast paths that pay off in training steps only: the block matrices' FP8 matmuls
        (train.fp8, pgolf.model.fp8), the fused q/k kernels (model.fused_qk, pgolf.model.fused_qk) and the
        fused softcap + cross-entropy of forward's loss (model.fused_ce, pgolf.model.fused_ce).

        A GPT is built with all off, as every evaluation runs it: on an H200 the fused q/k kernels made the
        record's sliding + TTT evaluation 21 % slower (docs/benchmarks.md). pgolf.train switches them on for
        its steps (before compiling them) and off again before calibration and evaluation."""
        for module in self.blocks.modules():
            if isinstance(module, CastedLinear):
                module.fp8 = bool(fp8)
        for block in self.blocks:
            block.attn.fused_qk = bool(fused_qk)
        self.fused_ce = bool(fused_ce)

    @contextlib.contextmanager
    def routed_blocks(self, block_call):
        """Inside the context every block runs as block_call(block, x, x0, cos, sin, ve, keep, doc_mask): one
        compiled function shared by all blocks of the same structure (pgolf.eval.scoring.compile_blocks_only,
        for evaluation and for training with train.compile_scope="blocks")."""
        previous, self.block_call = self.block_call, block_call
        try:
            yield
        finally:
            self.block_call = previous

    def embed_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """x0, the input of the first block: embedding (+ bigram) in model.residual_dtype, SmearGate v2 (before
        the norm), RMSNorm, SmearGate.

        The residual stream keeps that dtype through the blocks (their scales and mixes are cast to it). With
        float32 (the default) every elementwise pass over it moves 4 bytes a value; bfloat16 halves that, as
        the challenge's scripts do (their model is cast to bf16, the matrices kept fp32), at bf16 precision
        for the stream and its gradient. The parameters stay float32 either way, but for the embedding tables
        with model.embed_param_dtype=bfloat16 (the seeds' bf16 masters: their lookups are then bf16 too)."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids).to(x.dtype)
        if self.smear_v2 is not None:  # on the raw embedding, before the norm (frontier.md §3.1)
            x = self.smear_v2(x.to(self.residual_dtype), input_ids)
        x = self.input_norm(x.to(self.residual_dtype))
        if self.smear is not None:
            x = self.smear(x, input_ids)
        return x

    def run_blocks(self, x: torch.Tensor, input_ids: torch.Tensor, keep: int | None = None,
                   doc_mask=None, cache=None) -> torch.Tensor:
        """The blocks in their virtual order; `keep` (forward_hidden) goes to the last one, doc_mask to all,
        each virtual layer's part of `cache` (a pgolf.model.kv_cache.KVCache) to its block."""
        x0 = x
        offset = 0 if cache is None else cache.offset
        cos, sin = self.rotary.cos_sin(offset + input_ids.size(1), input_ids.device)
        cos, sin = cos[offset:], sin[offset:]
        ve = self.value_embed(input_ids) if self.value_embed is not None else None
        order = virtual_layer_order(self.cfg, self.recurrence_active)
        num_encoder = len(order) // 2 if self.skip_weights is not None else 0
        skips = []
        for position, layer in enumerate(order):
            block = self.blocks[layer]
            if block.lanes and not isinstance(x, tuple):
                x = (x, x)  # the first lane block: both lanes start as the stream
            if position >= num_encoder and skips:
                x = self.merge_skip(x, position - num_encoder, skips.pop())
            layer_ve = None
            if ve is not None and layer >= self.ve_first_layer:
                layer_ve = ve * self.ve_layer_scales[layer - self.ve_first_layer].to(ve.dtype)
            block_keep = keep if position == len(order) - 1 else None
            if cache is not None:
                x = block(x, x0, cos, sin, layer_ve, block_keep, doc_mask, cache.layer(position))
            elif self.block_call is None:
                x = block(x, x0, cos, sin, layer_ve, block_keep, doc_mask)
            else:
                x = self.block_call(block, x, x0, cos, sin, layer_ve, block_keep, doc_mask)
            if position < num_encoder:
                skips.append(x)
        if isinstance(x, tuple):
            x = 0.5 * (x[0] + x[1])
        return x

    def merge_skip(self, x, j: int, skip: torch.Tensor):
        """Decoder position j's skip into the stream (into lane 0 of a lane pair): added, or lerp-gated."""
        if isinstance(x, tuple):
            return self.merge_skip(x[0], j, skip), x[1]
        skip = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is not None:
            return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
        return x + skip

    def logits(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits (B, T, V) after the softcap."""
        return self.head_logits(self.forward_hidden(input_ids, doc_ids=doc_ids))

    def forward_hidden(self, input_ids: torch.Tensor, keep: int | None = None,
                       doc_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """The last block's output (B, T, D), before final_norm: with head_logits, `logits` split in two so
        that a scorer can apply the head to only the positions it scores (pgolf.eval.scoring).

        keep: only the last `keep` positions are wanted (B, keep, D). The last block then computes its queries,
        MLP and output there alone (its keys and values still come from every position): a sliding window of
        2,048 that scores 64 skips ~97% of that block's work, equal to the full forward's last positions up to
        float rounding. None (or keep >= T): every position.

        doc_ids (train.doc_mask): (B, T) document ids, non-decreasing along each row
        (pgolf.data.loader.batch_document_ids); each token's attention then reads only earlier tokens of its
        own document. The mask is built here, once for all blocks (pgolf.model.doc_attention).

        cache (pgolf.model.kv_cache.KVCache): input_ids are the next tokens of the rows the cache has read;
        their positions read the cached ones too, and the cache then holds these as well (in the eager
        blocks: not with keep, doc_ids or routed blocks)."""
        if keep is not None and keep < 1:
            raise ValueError(f"forward_hidden: keep={keep} must be at least 1")
        if cache is not None:
            return self.forward_cached(input_ids, cache, keep, doc_ids)
        keep = None if keep is None or keep >= input_ids.size(1) else keep
        doc_mask = None
        if doc_ids is not None:
            if keep is not None:
                raise ValueError("forward_hidden: doc_ids do not go with keep")
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"forward_hidden: doc_ids of shape {tuple(doc_ids.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}")
            # imported here: the exported script carries the module only with train.doc_mask
            from pgolf.model.doc_attention import doc_attention_mask

            doc_mask = doc_attention_mask(doc_ids)
        return self.run_blocks(self.embed_inputs(input_ids), input_ids, keep, doc_mask)

    def forward_cached(self, input_ids: torch.Tensor, cache, keep, doc_ids) -> torch.Tensor:
        """forward_hidden through a KV cache: the embedding runs on the cache's last tokens and the new ones,
        then drops the former, so that the features reading earlier tokens see them (kv_cache.CONTEXT_IDS)."""
        if keep is not None or doc_ids is not None or self.block_call is not None:
            raise ValueError("forward_hidden: a cache goes without keep, doc_ids and routed blocks")
        if cache.last_ids is None:
            x = self.embed_inputs(input_ids)
        else:
            context = cache.last_ids.size(1)
            x = self.embed_inputs(torch.cat((cache.last_ids, input_ids), dim=1))[:, context:]
        hidden = self.run_blocks(x, input_ids, cache=cache)
        cache.advance(input_ids)
        return hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits (..., V) after the softcap of hidden states from forward_hidden; position-wise."""
        return softcap_logits(self.head_projection(hidden).float(), self.cfg.logit_softcap)

    def head_projection(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits before the softcap, in the stream's (autocast) dtype."""
        x = self.final_norm(hidden)
        return F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.head is None else self.head(x)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor | None = None,
                reduction: str = "mean", doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if target_ids is not None and self.fused_ce:  # softcap + CE in one kernel, on the bf16 logits
            logits = self.head_projection(self.forward_hidden(input_ids, doc_ids=doc_ids))
            return softcapped_cross_entropy(logits, target_ids, self.cfg.logit_softcap, reduction)
        logits = self.logits(input_ids, doc_ids)
        if target_ids is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction)
        return loss.view_as(target_ids) if reduction == "none" else loss

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """matrix (Muon): 2D block matrices and the bigram/VE projections; embed: token, bigram and VE tables;
        head: the untied head; scalar: everything else. Every parameter is in exactly one group."""
        matrix = [m.weight for m in self.blocks.modules() if isinstance(m, CastedLinear)]
        embed = [self.tok_emb.weight]
        for feature in (self.bigram, self.value_embed):
            if feature is not None:
                matrix.append(feature.proj.weight)
                embed.append(feature.embed.weight)
        head = [self.head.weight] if self.head is not None else []
        taken = {id(p) for p in matrix + embed + head}
        scalar = [p for p in self.parameters() if id(p) not in taken]
        groups = {"matrix": matrix, "embed": embed, "head": head, "scalar": scalar}
        ids = [id(p) for group in groups.values() for p in group]
        assert len(ids) == len(set(ids)) == len(list(self.parameters())), "param groups overlap or miss one"
        casted = {id(m.weight) for m in self.modules() if isinstance(m, CastedLinear)}
        assert not casted & {id(p) for p in scalar}, "a CastedLinear weight fell into the scalar group"
        return groups

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
