"""Tokenizer files for transformers, written beside a checkpoint's spiece.model.

transformers 5 builds a wrong tokenizer from a rinna-style spiece.model (a leading `▁`,
no byte fallback, unknown characters as `<s>`), so every tool that reads a checkpoint
directory through `AutoTokenizer` (lm-evaluation-harness `hf`, Trainer scripts) would
feed the model other ids than the toolbox does. The files written here describe
sentencepiece's own segmentation in the `tokenizers` format, which transformers loads as
is. docs/tokenizer.md ("Tokenizer files for transformers") says how they were checked and
which inputs still differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolbox.errors import ToolboxError

# sentencepiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1
SPACE = "\u2581"  # sentencepiece's visible space
# Unicode reserves these for internal use; they stand in for characters NFKC would change.
NONCHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer_files(directory: str | os.PathLike, spiece_model_path: str | os.PathLike) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

    `model_max_length` comes from `directory`/config.json (max_position_embeddings) when that
    file exists. Returns the paths written.
    """
    try:
        from tokenizers import AddedToken
    except ImportError:
        raise ToolboxError(
            "writing tokenizer files for transformers needs the tokenizers library (it comes with "
            "transformers): pip install tokenizers"
        ) from None
    directory = Path(directory)
    path = Path(spiece_model_path)
    proto = _load_proto(path)
    tokenizer = _build(proto, path)
    specials = _special_tokens(proto)
    # sentencepiece always reads user-defined pieces (<NL>) from the text, never normalized.
    tokenizer.add_tokens(
        [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == USER_DEFINED]
    )
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in specials.values()])

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        # A literal "</s>" in the text is text, as in sentencepiece and the toolbox.
        "split_special_tokens": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    max_length = _max_positions(directory / "config.json")
    if max_length is not None:
        config["model_max_length"] = max_length

    texts = (tokenizer.to_str() + "\n", _json(config), _json(specials))
    paths = [directory / name for name in FILES]
    for target, text in zip(paths, texts):
        try:
            target.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ToolboxError(f"cannot write {target}: {exc.strerror or exc}") from None
    return paths


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _load_proto(path: Path):
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as exc:
        raise ToolboxError(f"cannot read sentencepiece model {path}: {exc.strerror or exc}") from None
    except DecodeError:
        raise ToolboxError(f"{path} is not a sentencepiece model") from None
    if not proto.pieces:
        raise ToolboxError(f"{path} is not a sentencepiece model (no pieces)")
    unsupported = {
        "model_type is not unigram": proto.trainer_spec.model_type != UNIGRAM,
        "add_dummy_prefix is on": proto.normalizer_spec.add_dummy_prefix,
        "remove_extra_whitespaces is on": proto.normalizer_spec.remove_extra_whitespaces,
    }
    for what, bad in unsupported.items():
        if bad:
            raise ToolboxError(
                f"{path}: cannot write transformers tokenizer files: {what} (supported: the series' conventions, "
                "unigram with no dummy prefix and whitespace kept)"
            )
    return proto


def _build(proto, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(
        models.Unigram(
            [(p.piece, p.score) for p in proto.pieces],
            unk_id=proto.trainer_spec.unk_id,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    normalizer = _normalizer(proto, path)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    steps = [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False)]
    guard = _guard_pattern(proto)
    if guard:
        steps.append(pre_tokenizers.Split(Regex(guard), behavior="merged_with_previous"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=False),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    return tokenizer


def _normalizer(proto, path: Path):
    """The model's normalization rule as `tokenizers` normalizers, checked on every code point.

    `tokenizers`' Precompiled normalizer reads sentencepiece's rule table per grapheme
    cluster, so on its own it misses the table's multi-character entries (ｶﾞ -> ガ) and
    drops the second half of CR LF. Composing with NFKC first does those, and the table
    then does the rest (the nmt whitespace and control-character rules, Unicode versions
    newer than NFKC's). The few characters the table keeps but NFKC changes (～) pass NFKC
    under a noncharacter stand-in. Every code point is checked against sentencepiece.
    """
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if not charsmap:
        return None  # identity: sentencepiece uses the text as given
    import sentencepiece as spm
    from tokenizers import normalizers

    core = [normalizers.NFKC(), normalizers.Precompiled(charsmap)]
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    cr = sp.normalize("\r").replace(SPACE, " ")
    if cr != "\r":  # CR LF is one grapheme cluster, which Precompiled would map as a whole to the CR's text
        core.insert(1, normalizers.Replace("\r", cr))
    # One pass over all code points; NUL separates them (no rule contains it, nothing composes with it).
    # sentencepiece shows spaces as ▁; the pre-tokenizer does the same after normalization.
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000]
    joined = "\0".join(chars)
    expected = sp.normalize(joined).split("\0")
    actual = normalizers.Sequence(core).normalize_str(joined).replace(" ", SPACE).split("\0")
    wrong = {c: e for c, e, a in zip(chars, expected, actual) if e != a}
    kept = [c for c, e in wrong.items() if e == c]
    unfixable = [c for c, e in wrong.items() if e != c]
    spare = [c for c in NONCHARACTERS if c not in wrong and sp.normalize(c) == c]
    if unfixable or len(kept) > len(spare):
        raise ToolboxError(
            f"{path}: cannot write transformers tokenizer files: normalization rule "
            f"{proto.normalizer_spec.name!r} is not NFKC-based ({len(wrong)} code points would differ, "
            f"e.g. {', '.join(f'U+{ord(c):04X}' for c in (unfixable or kept)[:5])})"
        )
    before = [normalizers.Replace(c, stand_in) for c, stand_in in zip(kept, spare)]
    after = [normalizers.Replace(stand_in, c) for c, stand_in in zip(kept, spare)]
    return normalizers.Sequence(before + core + after)


def _guard_pattern(proto) -> str:
    """A regex that cuts the text where no text piece spans, so no reserved piece can match.

    sentencepiece never reads control, unknown, unused or byte pieces (`</s>`, `<0x41>`) from
    text, but a `tokenizers` Unigram matches every piece of its vocabulary. Cutting each
    reserved piece between two characters that no normal piece holds side by side keeps it
    from matching and changes no other segmentation (no piece crosses the cut).
    """
    inside_text_pieces = {p.piece[i : i + 2] for p in proto.pieces if p.type == NORMAL for i in range(len(p.piece) - 1)}
    cuts = set()
    for p in proto.pieces:
        if p.type in (UNKNOWN, CONTROL, UNUSED, BYTE):
            pairs = (p.piece[i : i + 2] for i in range(len(p.piece) - 1))
            cut = next((pair for pair in pairs if pair not in inside_text_pieces), None)
            if cut is not None:
                cuts.add(cut)
    return "|".join(f"\\x{{{ord(a):X}}}(?=\\x{{{ord(b):X}}})" for a, b in sorted(cuts))


def _special_tokens(proto) -> dict[str, str]:
    """bos/eos/unk/pad pieces as the model file names them (absent ones left out)."""
    spec = proto.trainer_spec
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id, "pad_token": spec.pad_id}
    return {name: proto.pieces[i].piece for name, i in ids.items() if 0 <= i < len(proto.pieces)}


def _max_positions(config_path: Path) -> int | None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ToolboxError(f"cannot read {config_path}: {exc}") from None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None
