"""The text layer of generation: UTF-8-safe incremental detokenization, stop strings, <NL>."""

import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from toolbox.registry import EMBEDDED_DIR
from toolbox.streaming import TextAssembler
from toolbox.tokenizer import Tokenizer

TOK = Tokenizer(EMBEDDED_DIR / "spiece.model")
SP = spm.SentencePieceProcessor(model_file=str(EMBEDDED_DIR / "spiece.model"))
TEXT = "吾輩は猫である。名前はまだ無い🍣。𠮷野さんは ｱｲｳ と言った。"


def stream(ids, **kw):
    asm = TextAssembler(TOK.token_bytes, **kw)
    deltas = [asm.push(i) for i in ids]
    return asm, deltas


def test_deltas_join_to_the_text_and_appear_as_soon_as_a_character_is_complete():
    ids = SP.encode(TEXT)
    assert any(SP.is_byte(i) for i in ids), "the sample must exercise byte fallback"
    asm, deltas = stream(ids)
    assert "".join(deltas) + asm.finish() == TEXT
    shown = ""
    for k, delta in enumerate(deltas, 1):
        shown += delta
        # sentencepiece decodes a partial byte run to U+FFFD; all text before it is final
        reference = SP.decode(ids[:k]).split("\ufffd")[0]
        assert shown == reference, f"after {k} tokens"


def test_nothing_held_back_for_whole_pieces():
    ids = SP.encode("吾輩は猫である")
    _, deltas = stream(ids)
    assert all(d == SP.decode([i]) for d, i in zip(deltas, ids))


def test_stop_string_is_cut_exactly_even_across_tokens():
    ids = SP.encode(TEXT)
    for stop in ("名前", "まだ無", "🍣", "。"):
        asm, deltas = stream(ids, stop=(stop,))
        emitted = "".join(deltas)
        assert asm.stopped
        assert emitted == TEXT[: TEXT.find(stop)]
        assert asm.finish() == ""


def test_earliest_of_several_stop_strings_wins():
    asm, deltas = stream(SP.encode(TEXT), stop=("無い", "猫"))
    assert "".join(deltas) == "吾輩は"


def test_no_stop_means_everything_arrives():
    asm, deltas = stream(SP.encode(TEXT), stop=("存在しない",))
    assert "".join(deltas) + asm.finish() == TEXT and not asm.stopped


def test_nl_convention_with_nl_as_one_piece_and_split_into_pieces():
    nl_id = TOK.piece_to_id("<NL>")
    ids = SP.encode("一行目") + [nl_id] + SP.encode("二行目")
    asm, deltas = stream(ids, nl=True)
    assert "".join(deltas) + asm.finish() == "一行目\n二行目"
    # "<NL>" spelled with byte pieces: no "<" may leak out before the newline is known
    spelled = [TOK.piece_to_id(f"<0x{b:02X}>") for b in b"<NL>"]
    asm, deltas = stream(SP.encode("A") + spelled + SP.encode("B"), nl=True)
    assert all("<" not in d for d in deltas)
    assert "".join(deltas) + asm.finish() == "A\nB"


def test_a_lone_lt_is_released_at_the_end():
    asm, deltas = stream(SP.encode("a<"), nl=True)
    assert "".join(deltas) == "a"
    assert asm.finish() == "<"


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=40), st.data())
def test_stop_cut_property(raw, data):
    ids = SP.encode(raw)
    # the text the ids stand for: not always `raw` (a literal "▁" comes back as a space)
    text = SP.decode(ids)
    if not text:
        return
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 4))]
    asm, deltas = stream(ids, stop=(stop,))
    emitted = "".join(deltas) + asm.finish()
    assert emitted == text[: text.find(stop)]


def test_a_literal_meta_symbol_streams_as_the_space_it_decodes_to():
    """sentencepiece reads "▁" in a text as its space symbol: the stream shows a space, and a
    stop string matches what is shown."""
    asm, deltas = stream(SP.encode("a▁b"), stop=(" ",))
    assert "".join(deltas) + asm.finish() == "a" and asm.stopped
