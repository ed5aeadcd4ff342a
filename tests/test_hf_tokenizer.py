"""transformers' AutoTokenizer on the files toolbox.hf_tokenizer writes, against sentencepiece itself.

Two real sentencepiece models: the embedded one (identity normalization, the shipped files)
and the session's nmt_nfkc model (files written here). The ids must be sentencepiece's; the
cases docs/tokenizer.md lists as different are asserted to differ exactly as documented.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
from conftest import REPO, SAMPLE_LINES, SAMPLE_TEXT, TRAINING_SENTENCES, _clean_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from toolbox.errors import ToolboxError
from toolbox.hf_tokenizer import FILES, write_tokenizer_files
from toolbox.registry import EMBEDDED_DIR

SPACE = "\u2581"

# Lines cut from /work/shared/data (Aozora Bunko's 吾輩は猫である with its ruby and editor
# markup, and the public-domain English Botchan), then the awkward cases.
NOVEL_LINES = [
    "\u3000吾輩がこの家へ住み込んだ当時は、主人以外のものにははなはだ不人望であった。",
    "「車屋の方が強いに極《きま》っていらあな。御めえ［＃「御めえ」に傍点］のうち［＃「うち」に傍点］の主人を見ねえ、"
    "まるで骨と皮ばかりだぜ」",
    "\u3000\u3000\u30001905（明治38）年1月〜8月",
    "（例）一番｜獰悪《どうあく》な種族であった",
    "Because of an hereditary recklessness, I have been playing always a",
    '"waiter,"--a cowardly tactic this,--and had hearty laugh on me by seeing',
]
AWKWARD = [
    "   ",
    " 前後と途中に  空白   ",
    "\t\tタブ\t区切り\t",
    "全角　　スペース　",
    "ﾃﾞｰﾀﾍﾞｰｽとｶﾞｲﾄﾞﾌﾞｯｸ、ﾊﾟﾋﾟﾌﾟﾍﾟﾎﾟ",
    "波ダッシュ～と〜、チルダ~",
    "行の中のCR LF\r\nと単独の\rと\n改行",
    "👩🏽\u200d💻 🧑\u200d🤝\u200d🧑 ❤️\u200d🔥 1️⃣ 🇺🇳 🏴\u200d☠️",
    "𠀋𡈽𩸽と𪚲",
    "<0x41><0xE3>も[PAD]も<pad>も<unk>もただの文字列",
    "<NL><NL>改行<NL>",
    "</s></s><s>",
    "①②③ ㍻ ﬁ ℡ ＡＢＣ１２３",
    "\x00\x01\x7f\u200b\ufeff制御文字",
]
LINES = SAMPLE_LINES + NOVEL_LINES + AWKWARD

# Strings a user of a Japanese model meets, including what falls back to bytes. The only
# combining marks are the kana voicing marks. Left out are the characters with which NFKC
# composes or reorders where the rule's table does not (see test_documented_nfkc_differences):
# the ideographic tone marks U+302A..U+302F (reordered after a voicing mark), ￣ (its NFKC form
# ends in a combining macron) and ヿ (コト, whose ト takes a voicing mark).
DOCUMENTED = "".join(map(chr, range(0x302A, 0x3030))) + "\uffe3\u30ff"
JAPANESE_MIX = st.lists(
    st.one_of(
        st.sampled_from(sorted(set(SAMPLE_TEXT + "".join(LINES)))),
        st.sampled_from(["\u3099", "\u309a", "\u200d", "\ufe0f", "<NL>", "</s>", "<s>", "<unk>", "[PAD]", SPACE]),
        st.characters(min_codepoint=0x3000, max_codepoint=0x30FF, exclude_characters=DOCUMENTED),
        st.characters(min_codepoint=0xFF00, max_codepoint=0xFFEF, exclude_characters=DOCUMENTED),
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    ),
    max_size=30,
).map("".join)
# For the identity model anything goes.
ANY_TEXT = st.lists(st.one_of(st.characters(exclude_categories=("Cs",)), JAPANESE_MIX), max_size=20).map("".join)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def embedded():
    return AutoTokenizer.from_pretrained(EMBEDDED_DIR), spm.SentencePieceProcessor(
        model_file=str(EMBEDDED_DIR / "spiece.model")
    )


@pytest.fixture(scope="module")
def nfkc_dir(nfkc_model_dir, tmp_path_factory):
    """The nmt_nfkc model in a directory of its own, with files written by write_tokenizer_files."""
    out = tmp_path_factory.mktemp("nfkc_hf")
    for name in ("spiece.model", "config.json"):
        shutil.copy(nfkc_model_dir / name, out / name)
    write_tokenizer_files(out, out / "spiece.model")
    return out


@pytest.fixture(scope="module")
def nfkc(nfkc_dir, nfkc_sp):
    return AutoTokenizer.from_pretrained(nfkc_dir), nfkc_sp


@pytest.fixture(params=["embedded", "nfkc"])
def pair(request):
    return request.getfixturevalue(request.param)


def mismatches(hf, sp, texts):
    theirs = hf(texts, add_special_tokens=False)["input_ids"]
    return [(t, sp.encode(t, out_type=str), hf.convert_ids_to_tokens(ids)) for t, ids in zip(texts, theirs)
            if ids != sp.encode(t)]


def test_ids_equal_sentencepiece(pair):
    hf, sp = pair
    assert mismatches(hf, sp, LINES) == []
    assert [hf.encode(line, add_special_tokens=False) for line in LINES] == sp.encode(LINES)


def test_whole_multiline_text_with_crlf(pair):
    hf, sp = pair
    assert hf.encode(SAMPLE_TEXT, add_special_tokens=False) == sp.encode(SAMPLE_TEXT)


def test_default_adds_no_special_tokens(pair):
    """add_special_tokens defaults to True in transformers; there is no post-processor, so it adds nothing."""
    hf, sp = pair
    assert hf(LINES)["input_ids"] == sp.encode(LINES)
    assert hf.encode("吾輩は猫") == sp.encode("吾輩は猫")


def test_decode(pair):
    hf, sp = pair
    for ids in sp.encode(LINES):
        assert hf.decode(ids) == sp.decode(ids)


def test_decode_gives_back_the_text_under_identity(embedded):
    hf, sp = embedded
    for line in LINES:
        expected = line.replace(SPACE, " ")  # sentencepiece reads a literal ▁ as a space
        assert hf.decode(hf.encode(line, add_special_tokens=False)) == expected


def test_vocabulary_and_special_tokens_are_sentencepieces(pair):
    hf, sp = pair
    assert len(hf) == sp.get_piece_size()
    assert hf.convert_ids_to_tokens(list(range(sp.get_piece_size()))) == [
        sp.id_to_piece(i) for i in range(sp.get_piece_size())
    ]
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (
        sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert hf.model_max_length == 512  # max_position_embeddings of config.json


def test_special_token_literals_are_text_unless_asked(pair):
    hf, sp = pair
    text = "終わり</s>で<s>始まり"
    assert hf.encode(text, add_special_tokens=False) == sp.encode(text)
    assert sp.eos_id() not in sp.encode(text)
    # The opt-in of transformers 4's slow tokenizer: literals become the special ids.
    parsed = hf.encode(text, add_special_tokens=False, split_special_tokens=False)
    assert parsed == sp.encode("終わり") + [sp.eos_id()] + sp.encode("で") + [sp.bos_id()] + sp.encode("始まり")
    ids = [sp.bos_id()] + sp.encode("猫") + [sp.eos_id()]
    assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids) == "猫"


@PROPERTY
@given(JAPANESE_MIX)
def test_property_nfkc_model(nfkc, text):
    hf, sp = nfkc
    ids = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == sp.decode(ids)


@PROPERTY
@given(ANY_TEXT)
def test_property_identity_model(embedded, text):
    hf, sp = embedded
    ids = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text.replace(SPACE, " ")


# -- the differences docs/tokenizer.md documents ---------------------------------------------


@pytest.mark.parametrize(
    "text, sentencepiece_sees, transformers_sees",
    [
        # combining marks out of canonical order: NFKC reorders them, sentencepiece's table does not
        ("e\u0301\u0323", "\u00e9\u0323", "\u1eb9\u0301"),
        ("\u302a\u3099", "\u302a\u3099", "\u3099\u302a"),
        ("\uffe3\u3099", SPACE + "\u0304\u3099", SPACE + "\u3099\u0304"),
        ("\u30ff\u3099", "\u30b3\u30c8\u3099", "\u30b3\u30c9"),
        # compositions the table does not list: a letter that already has a mark, a Hangul syllable + jamo
        ("\u00c5\u0301", "\u00c5\u0301", "\u01fa"),
        ("\uac00\u11a8", "\uac00\u11a8", "\uac01"),
        # a character the table maps after NFKC, followed by a mark: tokenizers drops the mark
        (SPACE + "\u0301", SPACE + "\u0301", SPACE),
        ("\ufffd\u0301", SPACE + "\u0301", SPACE),
        # the noncharacter that stands in for ～ while NFKC runs
        ("\ufdd0", "\ufdd0", "～"),
    ],
)
def test_documented_nfkc_differences(nfkc, text, sentencepiece_sees, transformers_sees):
    hf, sp = nfkc
    assert sp.normalize(text) == sentencepiece_sees.replace(" ", SPACE)
    assert hf.backend_tokenizer.normalizer.normalize_str(text).replace(" ", SPACE) == transformers_sees
    assert hf.encode(text, add_special_tokens=False) == sp.encode(transformers_sees) != sp.encode(text)


def test_documented_long_text_near_tie(embedded):
    """sentencepiece sums scores in float32: on a long text a near-tie can go the other way."""
    hf, sp = embedded
    phrase = "どうか寝てくれたまえ"
    assert hf.encode(phrase, add_special_tokens=False) == sp.encode(phrase)
    text = "吾輩は猫である。" * 200 + phrase
    ours, theirs = sp.encode(text), hf.encode(text, add_special_tokens=False)
    assert ours != theirs
    same = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    assert ours[:same] == theirs[:same] == sp.encode("吾輩は猫である。" * 200 + "どうか")
    assert sp.decode(ours[same:]) == sp.decode(theirs[same:]) == "寝てくれたまえ"
    scores = [sum(sp.get_score(i) for i in ids[same:]) for ids in (ours, theirs)]
    assert 0 < scores[1] - scores[0] < 1e-3  # transformers found the better split, by less than float32 resolves


# -- the files ---------------------------------------------------------------------------------


def test_shipped_files_are_what_the_writer_writes(tmp_path):
    for name in ("spiece.model", "config.json"):
        shutil.copy(EMBEDDED_DIR / name, tmp_path / name)
    written = write_tokenizer_files(tmp_path, tmp_path / "spiece.model")
    assert [p.name for p in written] == list(FILES)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (EMBEDDED_DIR / name).read_bytes(), f"{name} is stale"


def test_config_files(tmp_path):
    shutil.copy(EMBEDDED_DIR / "spiece.model", tmp_path / "spiece.model")
    write_tokenizer_files(tmp_path, tmp_path / "spiece.model")  # no config.json: no length
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "model_max_length" not in config
    assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")} == json.loads(
        (tmp_path / "special_tokens_map.json").read_text(encoding="utf-8")
    ) == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}', encoding="utf-8")
    write_tokenizer_files(tmp_path, tmp_path / "spiece.model")
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 2048


def test_lm_eval_hf_model_reads_the_embedded_directory(embedded):
    """lm-evaluation-harness' `hf` model tokenizes through these files."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    lm = huggingface.HFLM(pretrained=str(EMBEDDED_DIR), device="cpu", batch_size=1)
    _, sp = embedded
    for line in LINES:
        assert lm.tok_encode(line) == sp.encode(line)


# -- errors ------------------------------------------------------------------------------------


def spm_model(tmp_path, **options):
    """A small real model; `options` override the series' conventions."""
    settings = dict(byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False) | options
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_SENTENCES * 20), model_writer=model, model_type="unigram", vocab_size=420,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, **settings,
    )
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    return tmp_path / "spiece.model"


def test_error_not_a_model(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(ToolboxError, match="is not a sentencepiece model"):
        write_tokenizer_files(tmp_path, tmp_path / "spiece.model")
    with pytest.raises(ToolboxError, match="cannot read sentencepiece model .*missing.model"):
        write_tokenizer_files(tmp_path, tmp_path / "missing.model")


def test_error_conventions_it_cannot_express(tmp_path):
    with pytest.raises(ToolboxError, match="add_dummy_prefix is on"):
        write_tokenizer_files(tmp_path, spm_model(tmp_path, add_dummy_prefix=True))
    (tmp_path / "rule.tsv").write_text("41\t61\n", encoding="utf-8")  # A -> a, and nothing else
    with pytest.raises(ToolboxError, match="normalization rule 'user_defined' is not NFKC-based"):
        write_tokenizer_files(tmp_path, spm_model(tmp_path, normalization_rule_tsv=str(tmp_path / "rule.tsv")))
    assert not any((tmp_path / name).exists() for name in FILES)


def test_error_unwritable_directory(tmp_path):
    with pytest.raises(ToolboxError, match="cannot write .*tokenizer.json"):
        write_tokenizer_files(tmp_path / "no" / "such", EMBEDDED_DIR / "spiece.model")


def test_error_without_tokenizers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an environment without it gives
    with pytest.raises(ToolboxError, match="pip install tokenizers"):
        write_tokenizer_files(tmp_path, EMBEDDED_DIR / "spiece.model")


def test_import_is_light():
    code = (
        "import sys, toolbox.hf_tokenizer; "
        "print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd=REPO)
    assert out.stdout.strip() == "[]", out.stderr

