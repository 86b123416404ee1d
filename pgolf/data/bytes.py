"""Per-token byte counts for bits per byte, from a SentencePiece model.

bpb divides the summed loss by the number of UTF-8 bytes the scored tokens stand for. A token's bytes are:
- control, unknown and unused pieces (<s>, <unk>, ...): 0 bytes, and they are a boundary;
- byte-fallback pieces <0xNN>: exactly 1 byte (not the 3 of a U+FFFD replacement);
- any other piece: the UTF-8 length of its text with a leading "▁" stripped, plus 1 byte for that space,
  unless the previous token is a boundary (after BOS the decoder drops the space).
So for a BOS-led document the bytes of its tokens add up to the UTF-8 length of the decoded (normalized) text.
A vocabulary with no standalone "▁" piece is refused: such tokenizers fold spaces into other pieces in ways
these rules do not count (PG#897 measured bpb about 20% too low).

Data whose text was transformed before tokenizing (CaseOps, pgolf.data.caseops) cannot be counted from the
pieces: it comes with a per-token byte sidecar, held here as a `ByteSidecar` (the val stream's bytes per
position, plus the tokenizer's ByteLUT for the second denominator). Every scorer takes either as its `lut`;
with a sidecar, a target's bytes are read at its position in the stream, not looked up from its id.
"""

from dataclasses import dataclass

import torch

from pgolf.errors import UserError

SP_SPACE = "\u2581"


@dataclass
class ByteLUT:
    base_bytes: torch.Tensor  # int16 (V,): bytes of the piece without its leading space
    has_space: torch.Tensor  # bool (V,): the piece starts with "▁"
    is_boundary: torch.Tensor  # bool (V,): control / unknown / unused (and ids past the tokenizer)

    def to(self, device) -> "ByteLUT":
        return ByteLUT(self.base_bytes.to(device), self.has_space.to(device), self.is_boundary.to(device))


@dataclass
class ByteSidecar:
    token_bytes: torch.Tensor  # int32 (n,): original UTF-8 bytes of each token of the val stream (BOS 0)
    lut: ByteLUT  # the tokenizer's table: its bytes are reported beside the sidecar's, never used in place

    def to(self, device) -> "ByteSidecar":
        return ByteSidecar(self.token_bytes.to(device), self.lut.to(device))


def byte_lut_of(source) -> ByteLUT:
    """The ByteLUT of a byte source (a ByteLUT, or a ByteSidecar's table)."""
    return source.lut if isinstance(source, ByteSidecar) else source


def build_byte_luts(sp, vocab_size: int) -> ByteLUT:
    """Byte LUTs for ids 0..vocab_size-1; ids past the tokenizer's size are 0-byte boundaries."""
    n = sp.get_piece_size()
    if vocab_size < n:
        raise UserError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n} pieces")
    if sp.piece_to_id(SP_SPACE) == sp.unk_id() or sp.id_to_piece(sp.piece_to_id(SP_SPACE)) != SP_SPACE:
        raise UserError("tokenizer has no standalone '\u2581' (space) piece: its byte counts would be wrong "
                        "(bpb too low); retrain it so that '\u2581' is in the vocabulary")
    base = torch.zeros(vocab_size, dtype=torch.int16)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SP_SPACE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUT(base, space, boundary)


def target_byte_counts(prev_ids: torch.Tensor, target_ids: torch.Tensor, lut, target_pos=None) -> torch.Tensor:
    """Bytes each target token stands for (int32, same shape): from a ByteLUT given the token before it, or
    from a ByteSidecar at target_pos (the targets' positions in the stream the sidecar belongs to)."""
    if isinstance(lut, ByteSidecar):
        if target_pos is None:
            raise UserError("a byte sidecar counts targets by their stream positions: target_pos is required")
        return lut.token_bytes[target_pos.long()].to(torch.int32)
    tgt = target_ids.long()
    prev = prev_ids.long()
    count = lut.base_bytes[tgt].to(torch.int32)
    count = count + (lut.has_space[tgt] & ~lut.is_boundary[prev]).to(torch.int32)
    return count
