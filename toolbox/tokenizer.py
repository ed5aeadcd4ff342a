"""The series' tokenizer, run by sentencepiece itself.

transformers 5.x tokenizes rinna-style models wrongly (it ignores `use_fast=False`),
so every id in this project comes from sentencepiece's own encoder. Settings
(special ids, normalization, byte fallback) are read from the model file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from toolbox.errors import ToolboxError

BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


@dataclass(frozen=True)
class Token:
    """One token of an encoded text; `start`/`end` are character offsets into the input."""

    id: int
    piece: str
    start: int
    end: int


class Tokenizer:
    """A sentencepiece model with the toolbox's conventions (no specials unless asked)."""

    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromFile(str(self.path))
        except (OSError, RuntimeError) as exc:
            raise ToolboxError(f"cannot load sentencepiece model {self.path}: {exc}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.threads = min(os.cpu_count() or 1, 8)

    # -- vocabulary -------------------------------------------------------------

    @cached_property
    def special_ids(self) -> dict[str, int]:
        """pad/unk/bos/eos ids as the model file defines them (absent ones omitted)."""
        ids = {
            "pad": self.sp.pad_id(),
            "unk": self.sp.unk_id(),
            "bos": self.sp.bos_id(),
            "eos": self.sp.eos_id(),
        }
        return {name: i for name, i in ids.items() if i >= 0}

    @cached_property
    def _special_literals(self) -> dict[str, int]:
        """Literal text of control and unknown pieces (`</s>`, `<s>`, ...) -> id."""
        return {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }

    @cached_property
    def _special_pattern(self) -> re.Pattern:
        literals = sorted(self._special_literals, key=len, reverse=True)
        return re.compile("|".join(re.escape(lit) for lit in literals))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None when the vocabulary has no such piece."""
        token_id = self.sp.piece_to_id(piece)
        if self.sp.is_unknown(token_id) and piece != self.sp.id_to_piece(token_id):
            return None
        return token_id

    def is_byte(self, token_id: int) -> bool:
        return self.sp.is_byte(token_id)

    def is_special(self, token_id: int) -> bool:
        return self.sp.is_control(token_id) or self.sp.is_unknown(token_id)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes each id decodes to, for incremental (streaming) detokenization."""
        table = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                table.append(bytes([int(BYTE_PIECE.fullmatch(piece).group(1), 16)]))
            elif self.sp.is_control(i):
                table.append(b"")
            else:
                table.append(self.sp.decode([i]).encode("utf-8"))
        return table

    @cached_property
    def settings(self) -> dict:
        """Trainer and normalizer settings stored in the model file."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
        return {
            "model_type": pb.TrainerSpec.ModelType.Name(trainer.model_type).lower(),
            "vocab_size": self.vocab_size,
            "byte_fallback": trainer.byte_fallback,
            "normalization": normalizer.name,
            "add_dummy_prefix": normalizer.add_dummy_prefix,
            "remove_extra_whitespaces": normalizer.remove_extra_whitespaces,
            "special_ids": self.special_ids,
            "user_defined_symbols": [
                p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED
            ],
        }

    # -- encoding ---------------------------------------------------------------

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._required("bos"))
        if eos:
            ids.append(self._required("eos"))
        return ids

    def _required(self, name: str) -> int:
        if name not in self.special_ids:
            raise ToolboxError(f"the tokenizer {self.path} defines no {name} token")
        return self.special_ids[name]

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text`; special-token literals stay plain text unless `parse_special`."""
        return self.encode_batch([text], bos=bos, eos=eos, parse_special=parse_special)[0]

    def encode_batch(
        self,
        texts: list[str],
        *,
        bos: bool = False,
        eos: bool = False,
        parse_special: bool = False,
    ) -> list[list[int]]:
        """Encode many texts at once (multi-threaded inside sentencepiece)."""
        if parse_special:
            batch = [[t.id for t in self.tokens(text, parse_special=True)] for text in texts]
        else:
            # sentencepiece's thread pool costs more than it saves on a single text
            batch = self.sp.encode(texts, num_threads=self.threads if len(texts) > 1 else 1)
        if bos or eos:
            batch = [self._wrap(ids, bos, eos) for ids in batch]
        return batch

    def tokens(
        self, text: str, *, bos: bool = False, eos: bool = False, parse_special: bool = False
    ) -> list[Token]:
        """Tokens of `text` with their pieces and character spans in the input."""
        segments = self._special_pattern.split(text) if parse_special else [text]
        literals = self._special_pattern.findall(text) if parse_special else []
        out: list[Token] = []
        offset = 0
        for i, segment in enumerate(segments):
            if segment:
                enc = self.sp.encode(segment, out_type="offset_mapping")
                out.extend(
                    Token(tid, piece, offset + s, offset + e)
                    for tid, piece, (s, e) in zip(enc["ids"], enc["pieces"], enc["offsets"])
                )
                offset += len(segment)
            if i < len(literals):
                lit = literals[i]
                out.append(Token(self._special_literals[lit], lit, offset, offset + len(lit)))
                offset += len(lit)
        if bos:
            out.insert(0, Token(self._required("bos"), self.sp.id_to_piece(self._required("bos")), 0, 0))
        if eos:
            eos_id = self._required("eos")
            out.append(Token(eos_id, self.sp.id_to_piece(eos_id), len(text), len(text)))
        return out

    # -- decoding ---------------------------------------------------------------

    def check_ids(self, ids: list[int]) -> None:
        """Raise ValueError naming the first id outside the vocabulary."""
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is out of range (vocabulary 0..{self.vocab_size - 1})")

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` as sentencepiece decodes it (special tokens decode to nothing)."""
        self.check_ids(ids)
        return self.sp.decode(ids)

    def pieces_to_ids(self, pieces: list[str]) -> list[int]:
        """Ids of pieces; ValueError naming the first unknown piece."""
        ids = []
        for piece in pieces:
            token_id = self.piece_to_id(piece)
            if token_id is None:
                raise ValueError(f"unknown piece {piece!r}")
            ids.append(token_id)
        return ids

    def normalize(self, text: str) -> str:
        """The text as the model's normalizer sees it (spaces shown as ▁)."""
        return self.sp.normalize(text)
