"""CaseOps (`lossless_caps_caseops_v1`): case as operator characters, and the per-token byte sidecar.

The transform rewrites every maximal run of ASCII letters [A-Za-z] (any other character ends a run and is
copied as it is) so that a tokenizer sees only lowercase ASCII letters:
- all lowercase: unchanged;
- two or more letters, all uppercase: ALLCAPS + the run in lowercase;
- first letter uppercase, any others lowercase (a lone capital too): TITLE + the run in lowercase;
- anything else: TITLE when the first letter is uppercase, then the letters in lowercase, each later
  uppercase letter preceded by CAPNEXT ("iPhone" -> "i" CAPNEXT "phone").
The operators are the private-use characters TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003 and ESC U+E004;
one of them found in the input is written ESC + itself. `caseops_decode(caseops_encode(s)) == s` for every s.

The tokenizer (`fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model`: the four operators are ids 4-7,
user-defined pieces) reads the transformed text through its normaliser (nmt_nfkc, measured with
sentencepiece 0.2.3), which does not keep every character:
- NFKC folds compatibility characters (fullwidth letters, ligatures such as "ﬁ" -> "fi", "½" -> "1⁄2",
  "™" -> "TM") and composes combining sequences ("e" + U+0301 -> "é");
- it drops most C0/C1 control characters (seen: U+0001, U+0007, U+000B, U+001F, U+007F, U+009F; NUL and
  U+0085 are kept, as byte pieces);
- it turns \\t \\n \\r \\f, U+00A0, U+2009, U+2028, U+3000, U+200B, U+200C and an interior U+FEFF into spaces,
  folds each run of spaces into one "▁" inside the next piece, and drops a document's leading and trailing
  whitespace (a leading U+FEFF too).
So the ids decode (then `caseops_decode`) to that folded text, not to the original.

The sidecar gives each token the UTF-8 bytes of the ORIGINAL text it stands for. SentencePiece reports each
piece's span of the transformed text (`offset_mapping`); the spans are made to tile it: piece i covers from
the end of piece i-1 (0 for the first) to its own end (the end of the text for the last), so a character
the normaliser dropped, or folded into a "▁", is charged to the piece that follows it. Inside a span an
operator character counts 0 bytes, a literal operator (the character after an ESC) 3, any other character
its UTF-8 length: an ASCII letter is 1 byte whatever its case. A document's counts (BOS 0) therefore add
up to exactly `len(text.encode("utf-8"))`; where nothing is dropped they equal the record's surface rule.
"""

import re

import numpy as np

from pgolf.errors import UserError

CASEOPS_TRANSFORM = "lossless_caps_caseops_v1"
CASEOPS_TITLE = "\ue001"
CASEOPS_ALLCAPS = "\ue002"
CASEOPS_CAPNEXT = "\ue003"
CASEOPS_ESC = "\ue004"
CASEOPS_OPERATORS = (CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC)
CASEOPS_MAX_TOKEN_BYTES = 65535  # the sidecar stores uint16

_CASEOPS_ENCODE_RE = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# an escape pair, a lone operator, a letter run, or a run of anything else
_CASEOPS_DECODE_RE = re.compile("\ue004[\\s\\S]|[\ue001-\ue004]|[A-Za-z]+|[^A-Za-z\ue001-\ue004]+")
_CASEOPS_OPERATOR_RE = re.compile("[\ue001-\ue004]")


class CaseOpsError(UserError):
    """Text that is not a well-formed CaseOps transform (a misplaced or dangling operator)."""


def _caseops_word(match) -> str:
    word = match.group()
    if word in CASEOPS_OPERATORS:
        return CASEOPS_ESC + word
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return CASEOPS_ALLCAPS + lower
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return CASEOPS_TITLE + lower
    head = (CASEOPS_TITLE if word[0].isupper() else "") + lower[0]
    return head + "".join(CASEOPS_CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def caseops_encode(text: str) -> str:
    """The lossless_caps_caseops_v1 transform of text (module docstring)."""
    return _CASEOPS_ENCODE_RE.sub(_caseops_word, text)


class _CaseOpsDecoder:
    """The inverse's state between segments: a pending word mode, a pending CAPNEXT, inside a word,
    and whether the current word is all caps."""

    def __init__(self):
        self.pending, self.capnext, self.in_word, self.allcaps = None, False, False, False

    def marker_pending(self) -> bool:
        return self.pending is not None or self.capnext

    def letters(self, run: str) -> str:
        if not self.in_word:
            first = run[0].upper() if self.marker_pending() else run[0]
            self.allcaps = self.pending == "allcaps"
            self.pending, self.capnext, self.in_word = None, False, True
            run = run[1:]
        else:
            first = ""
        if self.allcaps:
            return first + run.upper()
        if self.capnext and run:
            self.capnext = False
            return first + run[0].upper() + run[1:]
        return first + run

    def step(self, seg: str, where: int) -> str:
        if len(seg) == 2 and seg[0] == CASEOPS_ESC:
            if self.marker_pending():
                raise CaseOpsError(f"caseops text: an escaped character after a case marker at offset {where}")
            self.in_word = seg[1].isascii() and seg[1].isalpha()
            self.allcaps = self.allcaps and self.in_word
            return seg[1]
        if seg in (CASEOPS_TITLE, CASEOPS_ALLCAPS):
            if self.marker_pending() or self.in_word:
                raise CaseOpsError(f"caseops text: a word marker inside a word or after a marker at offset {where}")
            self.pending = "title" if seg == CASEOPS_TITLE else "allcaps"
            return ""
        if seg == CASEOPS_CAPNEXT:
            if self.capnext:
                raise CaseOpsError(f"caseops text: two CAPNEXT markers in a row at offset {where}")
            self.capnext = True
            return ""
        if seg == CASEOPS_ESC:
            raise CaseOpsError(f"caseops text: a dangling ESC at offset {where}")
        if seg[0].isascii() and seg[0].isalpha():
            return self.letters(seg)
        if self.marker_pending():
            raise CaseOpsError(f"caseops text: a case marker not followed by a letter at offset {where}")
        self.in_word = self.allcaps = False
        return seg


def caseops_decode(text: str) -> str:
    """The inverse of caseops_encode; CaseOpsError on a misplaced or dangling operator."""
    state = _CaseOpsDecoder()
    out = [state.step(m.group(), m.start()) for m in _CASEOPS_DECODE_RE.finditer(text)]
    if state.marker_pending():
        raise CaseOpsError("caseops text: a case marker at the end of the text")
    return "".join(out)


def caseops_char_bytes(transformed: str) -> np.ndarray:
    """Original UTF-8 bytes each character of a caseops_encode output stands for (int64, one per char):
    operators 0, a literal operator after an ESC 3, any other character its UTF-8 length."""
    cp = np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4")
    weights = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    escaped = -1
    for m in _CASEOPS_OPERATOR_RE.finditer(transformed):
        i = m.start()
        if i == escaped:
            continue  # a literal operator: its own 3 bytes
        weights[i] = 0
        if m.group() == CASEOPS_ESC:
            escaped = i + 1
    return weights


def tiled_piece_bytes(char_bytes: np.ndarray, ends) -> np.ndarray:
    """Bytes per piece when piece i covers characters [end of piece i-1, its end) and the last piece runs
    to the end of the text (ends: each piece's end offset, in characters); their sum is char_bytes.sum()."""
    if len(ends) == 0:
        return np.zeros(0, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(char_bytes)])
    stops = np.maximum.accumulate(np.asarray(ends, dtype=np.int64))
    stops[-1] = char_bytes.size
    starts = np.concatenate([[0], stops[:-1]])
    return cum[stops] - cum[starts]


def caseops_encode_document(sp, text: str) -> tuple[list[int], np.ndarray]:
    """(ids, original bytes per id) of one document: caseops_encode, then the tokenizer; the bytes add up
    to len(text.encode("utf-8")) (module docstring). UserError where they cannot be stored or counted."""
    transformed = caseops_encode(text)
    try:
        enc = sp.encode(transformed, out_type="offset_mapping")
    except (ValueError, TypeError) as e:
        raise UserError(f"the CaseOps byte sidecar needs sentencepiece >= 0.2.1 (offset_mapping): {e}") from None
    ids = list(enc["ids"])
    counts = tiled_piece_bytes(caseops_char_bytes(transformed), [end for _, end in enc["offsets"]])
    total = len(text.encode("utf-8"))
    if ids and int(counts.sum()) != total:
        raise UserError(f"CaseOps sidecar: a document's pieces count {int(counts.sum())} bytes, its text {total}")
    if counts.size and int(counts.max()) > CASEOPS_MAX_TOKEN_BYTES:
        raise UserError(f"CaseOps sidecar: one token stands for {int(counts.max())} bytes (> {CASEOPS_MAX_TOKEN_BYTES}:"
                        " uint16); a document has a huge run of whitespace")
    return ids, counts


def is_caseops_tokenizer(sp) -> bool:
    """Whether the tokenizer has the four CaseOps operators as pieces of their own."""
    unk = sp.unk_id()
    return all(sp.piece_to_id(op) != unk for op in CASEOPS_OPERATORS)
