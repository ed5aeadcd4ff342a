"""toolbox.tokenizer.Tokenizer against sentencepiece itself (the independent reference)."""

from __future__ import annotations

import pytest
from conftest import SAMPLE_TEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolbox.errors import ToolboxError
from toolbox.tokenizer import Tokenizer

SPACE = "\u2581"  # sentencepiece's whitespace mark; a literal one in the input decodes to " "

# Arbitrary Unicode (no lone surrogates: they cannot be UTF-8 encoded), with the
# characters of the Japanese sample and the whitespace cases mixed in often.
UNICODE = st.characters(exclude_categories=("Cs",))
MIXED = st.one_of(
    UNICODE,
    st.sampled_from(sorted(set(SAMPLE_TEXT))),
    st.sampled_from([" ", "\t", "\r", "\n", "\u3000", "\x00", "<NL>", "</s>", "<s>", "<unk>"]),
)
TEXTS = st.lists(MIXED, max_size=40).map("".join)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def byte_value(piece: str) -> int:
    assert piece.startswith("<0x") and piece.endswith(">"), piece
    return int(piece[3:-1], 16)


def check_spans(tok: Tokenizer, text: str, tokens) -> None:
    """Spans tile the input, and each token's span is the text it encodes.

    A byte-fallback character is split over several `<0xNN>` tokens: the first ones
    get an empty span at the character, the last one the character's whole span.
    """
    pos = 0
    pending = b""
    for t in tokens:
        assert t.start == pos, (text, t)
        assert t.end >= t.start
        if tok.is_byte(t.id):
            pending += bytes([byte_value(t.piece)])
            if t.end > t.start:
                assert pending.decode("utf-8") == text[t.start : t.end]
                pending = b""
        else:
            assert not pending
            assert text[t.start : t.end] == t.piece.replace(SPACE, " ")
        pos = t.end
    assert pos == len(text) and not pending


# -- parity on the Japanese sample ------------------------------------------------------


def test_sample_covers_the_hard_cases(sample_lines, sp_ref):
    """Guard the fixture itself: it must exercise byte fallback, CRLF and empty lines."""
    fallback = [line for line in sample_lines if any(sp_ref.is_byte(i) for i in sp_ref.encode(line))]
    assert any("🍣" in line for line in fallback) and any("𠮷" in line for line in fallback)
    assert "" in sample_lines and "\r\n" in SAMPLE_TEXT and "\u3000" in SAMPLE_TEXT


def test_ids_and_pieces_match_sentencepiece_on_every_line(embedded_tok, sp_ref, sample_lines):
    for line in sample_lines:
        expected_ids = sp_ref.encode(line)
        expected_pieces = sp_ref.encode(line, out_type=str)
        assert embedded_tok.encode(line) == expected_ids, line
        assert [embedded_tok.id_to_piece(i) for i in expected_ids] == expected_pieces
        tokens = embedded_tok.tokens(line)
        assert [t.id for t in tokens] == expected_ids
        assert [t.piece for t in tokens] == expected_pieces


def test_batch_matches_line_by_line_reference(embedded_tok, sp_ref, sample_lines):
    assert embedded_tok.encode_batch(sample_lines) == [sp_ref.encode(line) for line in sample_lines]


def test_identity_model_round_trips_every_line_and_the_whole_text(embedded_tok, sample_lines):
    for line in sample_lines:
        assert embedded_tok.decode(embedded_tok.encode(line)) == line
    assert embedded_tok.decode(embedded_tok.encode(SAMPLE_TEXT)) == SAMPLE_TEXT


def test_decode_matches_sentencepiece(embedded_tok, sp_ref, sample_lines):
    for line in sample_lines:
        ids = sp_ref.encode(line)
        assert embedded_tok.decode(ids) == sp_ref.decode(ids)


def test_spans_on_sample(embedded_tok, sample_lines):
    for line in sample_lines:
        check_spans(embedded_tok, line, embedded_tok.tokens(line))


def test_token_bytes_concatenate_to_the_utf8_input(embedded_tok, sp_ref, sample_lines):
    table = embedded_tok.token_bytes
    assert len(table) == sp_ref.get_piece_size()
    for line in sample_lines:
        assert b"".join(table[i] for i in sp_ref.encode(line)) == line.encode("utf-8")


def test_settings_read_from_the_model_file(embedded_tok, sp_ref, nfkc_model_dir):
    s = embedded_tok.settings
    assert s["normalization"] == "identity"
    assert s["byte_fallback"] is True
    assert s["add_dummy_prefix"] is False and s["remove_extra_whitespaces"] is False
    assert s["vocab_size"] == sp_ref.get_piece_size()
    assert "<NL>" in s["user_defined_symbols"]
    assert embedded_tok.special_ids == {
        "pad": sp_ref.pad_id(), "unk": sp_ref.unk_id(), "bos": sp_ref.bos_id(), "eos": sp_ref.eos_id()
    }
    assert Tokenizer(nfkc_model_dir / "spiece.model").settings["normalization"] == "nmt_nfkc"


def test_nl_literal_is_one_piece(embedded_tok, sp_ref):
    nl = sp_ref.piece_to_id("<NL>")
    assert sp_ref.id_to_piece(nl) == "<NL>"
    assert embedded_tok.encode("<NL>") == [nl]


# -- normalization (the nmt_nfkc model) -------------------------------------------------


def test_nfkc_model_parity_and_non_round_trip(nfkc_model_dir, nfkc_sp, sample_lines):
    tok = Tokenizer(nfkc_model_dir / "spiece.model")
    changed = []
    for line in sample_lines:
        assert tok.encode(line) == nfkc_sp.encode(line)
        assert [t.id for t in tok.tokens(line)] == nfkc_sp.encode(line)
        if tok.decode(tok.encode(line)) != line:
            changed.append(line)
    # Half-width katakana, tabs, U+3000 and full-width letters do not survive nmt_nfkc.
    assert any("ｱ" in line for line in changed)
    assert any("\t" in line for line in changed)
    assert any("\u3000" in line for line in changed)
    assert any("ＡＢＣ" in line for line in changed)
    assert tok.decode(tok.encode("ｱＡ")) == "アA"


def test_nfkc_spans_stay_inside_the_input(nfkc_model_dir, sample_lines):
    """Offsets refer to the original text even where normalization changed its length."""
    tok = Tokenizer(nfkc_model_dir / "spiece.model")
    for line in sample_lines:
        tokens = tok.tokens(line)
        assert all(0 <= t.start <= t.end <= len(line) for t in tokens)
        assert [t.start for t in tokens] == sorted(t.start for t in tokens)
        if tokens:
            assert tokens[0].start == 0 and tokens[-1].end == len(line)


# -- special tokens ------------------------------------------------------------------


def test_special_literals_are_text_unless_parse_special(embedded_tok, sp_ref):
    text = "前</s>後<s>"
    eos, bos = sp_ref.eos_id(), sp_ref.bos_id()
    plain = embedded_tok.encode(text)
    assert plain == sp_ref.encode(text)
    assert eos not in plain and bos not in plain
    assert embedded_tok.decode(plain) == text

    parsed = embedded_tok.encode(text, parse_special=True)
    assert parsed == sp_ref.encode("前") + [eos] + sp_ref.encode("後") + [bos]
    tokens = embedded_tok.tokens(text, parse_special=True)
    assert [t.id for t in tokens] == parsed
    eos_token = next(t for t in tokens if t.id == eos)
    assert text[eos_token.start : eos_token.end] == "</s>"


def test_parse_special_unk_and_adjacent_literals(embedded_tok, sp_ref):
    assert embedded_tok.encode("<unk></s></s>", parse_special=True) == [sp_ref.unk_id(), sp_ref.eos_id(), sp_ref.eos_id()]
    assert embedded_tok.encode("</s", parse_special=True) == sp_ref.encode("</s")


def test_bos_eos_flags(embedded_tok, sp_ref, sample_lines):
    for line in sample_lines:
        assert embedded_tok.encode(line, bos=True) == sp_ref.encode(line, add_bos=True)
        assert embedded_tok.encode(line, eos=True) == sp_ref.encode(line, add_eos=True)
        assert embedded_tok.encode(line, bos=True, eos=True) == sp_ref.encode(line, add_bos=True, add_eos=True)
    assert embedded_tok.encode_batch(["a", "b"], eos=True) == sp_ref.encode(["a", "b"], add_eos=True)
    tokens = embedded_tok.tokens("猫", bos=True, eos=True)
    assert (tokens[0].id, tokens[0].start, tokens[0].end) == (sp_ref.bos_id(), 0, 0)
    assert (tokens[-1].id, tokens[-1].start, tokens[-1].end) == (sp_ref.eos_id(), 1, 1)
    assert embedded_tok.decode(embedded_tok.encode("猫", bos=True, eos=True)) == "猫"


# -- vocabulary look-ups and errors ------------------------------------------------------


def test_pieces_to_ids(embedded_tok, sp_ref):
    pieces = sp_ref.encode("吾輩は猫🍣", out_type=str)
    assert embedded_tok.pieces_to_ids(pieces) == [sp_ref.piece_to_id(p) for p in pieces]
    assert embedded_tok.pieces_to_ids(["<unk>"]) == [sp_ref.unk_id()]  # the unk piece itself is known
    with pytest.raises(ValueError, match="no-such-piece"):
        embedded_tok.pieces_to_ids([pieces[0], "no-such-piece"])
    assert embedded_tok.piece_to_id("no-such-piece") is None


def test_check_ids_out_of_range(embedded_tok, sp_ref):
    size = sp_ref.get_piece_size()
    embedded_tok.check_ids([0, size - 1])
    for bad in (size, -1, 10**9):
        with pytest.raises(ValueError, match=str(bad)):
            embedded_tok.check_ids([0, bad])
        with pytest.raises(ValueError, match=str(bad)):
            embedded_tok.decode([sp_ref.unk_id(), bad])


def test_missing_model_file_is_a_toolbox_error(tmp_path):
    with pytest.raises(ToolboxError, match="cannot load"):
        Tokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ToolboxError, match="cannot load"):
        Tokenizer(bad)


# -- properties on arbitrary Unicode ----------------------------------------------------


@PROPERTY
@given(TEXTS)
def test_property_encode_equals_sentencepiece(embedded_tok, sp_ref, text):
    assert embedded_tok.encode(text) == sp_ref.encode(text)


@PROPERTY
@given(TEXTS.filter(lambda t: SPACE not in t))
def test_property_identity_round_trip(embedded_tok, text):
    ids = embedded_tok.encode(text)
    assert embedded_tok.decode(ids) == text
    assert b"".join(embedded_tok.token_bytes[i] for i in ids) == text.encode("utf-8")


def test_literal_space_mark_is_the_one_known_exception(embedded_tok):
    """sentencepiece itself reads U+2581 as a space: documented, not a toolbox bug."""
    assert embedded_tok.decode(embedded_tok.encode("a\u2581b")) == "a b"


@PROPERTY
@given(TEXTS.filter(lambda t: SPACE not in t))
def test_property_spans_slice_back_to_pieces(embedded_tok, text):
    check_spans(embedded_tok, text, embedded_tok.tokens(text))


@PROPERTY
@given(st.lists(st.one_of(TEXTS, st.sampled_from(["</s>", "<s>", "<unk>", "[PAD]"])), max_size=6))
def test_property_parse_special_splits_on_literals(embedded_tok, sp_ref, parts):
    text = "".join(parts)
    ids = embedded_tok.encode(text, parse_special=True)
    specials = {sp_ref.id_to_piece(i): i for i in range(sp_ref.get_piece_size()) if sp_ref.is_control(i) or sp_ref.is_unknown(i)}
    # Independent reference: split on the literals by hand and let sentencepiece encode the rest.
    expected, rest = [], text
    while rest:
        hits = [(rest.find(lit), -len(lit), lit) for lit in specials if lit in rest]
        if not hits:
            expected += sp_ref.encode(rest)
            break
        pos, _, lit = min(hits)
        expected += sp_ref.encode(rest[:pos]) + [specials[lit]]
        rest = rest[pos + len(lit) :]
    assert ids == expected
    assert [t.id for t in embedded_tok.tokens(text, parse_special=True)] == ids
