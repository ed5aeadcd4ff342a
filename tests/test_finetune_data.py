"""toolbox.finetune.data: reading, checking and encoding training records (no model, no torch).

Bad records must fail with one line naming the file, line and field (or be counted with
--skip-invalid); tagging labels must land on the sentencepiece pieces that spell each
entity, byte-fallback pieces included (checked against the pieces' own UTF-8 bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _clean_env

from toolbox.errors import ToolboxError
from toolbox.finetune.data import (
    IGNORE,
    DataSpec,
    Fields,
    align_entities,
    bio_names,
    encode,
    load_records,
    piece_spans,
)
from toolbox.prompts import chat_prompt, to_model_text


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


CLASSIFY = [{"text": f"文{i}です。", "label": "a" if i % 2 else "b"} for i in range(20)]


# -- reading and checking -----------------------------------------------------------


def test_classify_labels_found_and_held_out(tmp_path):
    records = load_records("classify", DataSpec(train=str(write_jsonl(tmp_path / "t.jsonl", CLASSIFY)),
                                                eval_fraction=0.25))
    assert records.labels == ["a", "b"]
    assert len(records.train) == 15 and len(records.eval) == 5
    assert {r["text"] for r in records.train} | {r["text"] for r in records.eval} == {r["text"] for r in CLASSIFY}
    assert not {r["text"] for r in records.train} & {r["text"] for r in records.eval}


def test_given_labels_keep_their_order_and_numbers_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": n} for n in (10, 2, 1)])
    spec = DataSpec(train=str(path), eval_fraction=0)
    assert load_records("classify", spec).labels == ["1", "2", "10"]
    given = DataSpec(train=str(path), eval_fraction=0, labels=("10", "1", "2"))
    assert load_records("classify", given).labels == ["10", "1", "2"]


def test_fingerprint_follows_the_data(tmp_path):
    spec = DataSpec(train=str(write_jsonl(tmp_path / "a.jsonl", CLASSIFY)))
    same = DataSpec(train=str(write_jsonl(tmp_path / "b.jsonl", CLASSIFY)))
    changed = DataSpec(train=str(write_jsonl(tmp_path / "c.jsonl", [*CLASSIFY[:-1], {"text": "別", "label": "a"}])))
    fp = load_records("classify", spec).fingerprint()
    assert fp == load_records("classify", same).fingerprint()
    assert fp != load_records("classify", changed).fingerprint()


BAD = [
    # (task, records, error fragments)
    ("classify", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}],
     [":3: field 'label': missing"]),
    ("classify", [{"text": "a", "label": "x"}, {"label": "y"}], [":2: field 'text': missing"]),
    ("classify", [{"text": "a", "label": "x"}, {"text": 5, "label": "y"}], [":2: field 'text': expected a string"]),
    ("classify", [{"text": "a", "label": "x"}, {"text": "  ", "label": "y"}], [":2: field 'text': empty"]),
    ("classify", [{"text": "a", "label": "x"}, {"text": "b", "label": [1]}], [":2: field 'label'"]),
    ("classify", [{"text": "a", "label": "x"}, '{"text": "b", "label": "y"', {"text": "c", "label": "y"}],
     [":2: invalid JSON"]),
    ("classify", [{"text": "a", "label": "x"}, "[1, 2]"], [":2: not a JSON object"]),
    ("classify", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], ["at least two labels"]),
    ("tag", [{"text": "山田さん", "entities": [[0, 9, "PER"]]}], [":1: field 'entities': entity 1 [0, 9) is out of range"]),
    ("tag", [{"text": "山田さん", "entities": [[2, 2, "PER"]]}], [":1: field 'entities': entity 1 [2, 2) is out of range"]),
    ("tag", [{"text": "山田太郎さん", "entities": [[0, 2, "PER"], [1, 4, "PER"]]}],
     [":1: field 'entities': entities 1 [0, 2) and 2 [1, 4) overlap"]),
    ("tag", [{"text": "山田", "entities": [{"start": 0, "end": "2", "label": "PER"}]}],
     [":1: field 'entities': entity 1: start and end must be integers"]),
    ("tag", [{"text": "山田", "entities": [[0, 2]]}], [":1: field 'entities': entity 1: expected"]),
    ("tag", [{"text": "山田", "entities": "PER"}], [":1: field 'entities'"]),
    ("tag", [{"tokens": ["John", "lives"], "tags": ["B-PER"]}], [":1: field 'tags': 1 tags for 2 words"]),
    ("tag", [{"tokens": ["John", "lives"], "tags": ["PER", "O"]}], [":1: field 'tags': tag 1 'PER' is not O"]),
    ("tag", [{"tokens": ["John", ""], "tags": ["B-PER", "O"]}], [":1: field 'tokens'"]),
    ("tag", [{"entities": []}], [":1: field 'text': missing (or give 'tokens' and 'tags')"]),
    ("tag", [{"tokens": ["John"]}], [":1: field 'tags': missing"]),
    ("lm", [{"text": "ok"}, {"instruction": "質問"}], [":2: field 'output': missing"]),
    ("lm", [{"text": "ok"}, {"output": "答え"}], [":2: field 'instruction': missing"]),
    ("lm", [{"text": "ok"}, {"body": "x"}], [":2: field 'text': missing"]),
]


@pytest.mark.parametrize("task, records, fragments", BAD)
def test_bad_records_are_one_line_errors(tmp_path, task, records, fragments):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(ToolboxError) as info:
        load_records(task, DataSpec(train=str(path), eval_fraction=0))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    if fragments[0].startswith(":"):
        assert message.startswith(str(path))


def test_unknown_labels_in_eval_and_against_given_labels(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CLASSIFY)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "zz"}])
    with pytest.raises(ToolboxError, match=r"eval\.jsonl:2: field 'label': unknown label 'zz' \(known: a, b\)"):
        load_records("classify", DataSpec(train=str(train), eval=str(evaluation)))
    with pytest.raises(ToolboxError, match=r"train\.jsonl:\d+: field 'label': unknown label 'b' \(known: a\)"):
        load_records("classify", DataSpec(train=str(train), labels=("a",), eval_fraction=0))
    tags = write_jsonl(tmp_path / "tags.jsonl", [{"text": "山田が", "entities": [[0, 2, "PER"]]},
                                                  {"text": "東京で", "entities": [[0, 2, "LOC"]]}])
    with pytest.raises(ToolboxError, match=r"tags\.jsonl:2: field 'entities': unknown label 'LOC' \(known: PER\)"):
        load_records("tag", DataSpec(train=str(tags), labels=("PER",), eval_fraction=0))


def test_skip_invalid_counts_by_reason(tmp_path):
    rows = [*CLASSIFY, {"text": "x"}, {"label": "a"}, {"text": "y"}, "not json", {"text": "z", "label": "c"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    records = load_records("classify", DataSpec(train=str(train), eval_fraction=0, labels=("a", "b"),
                                                 skip_invalid=True))
    assert len(records.train) == len(CLASSIFY)
    assert records.skipped.counts == {"missing field 'label'": 2, "missing field 'text'": 1, "invalid JSON": 1,
                                      "unknown label": 1}
    summary = records.skipped.summary()
    assert summary.startswith("skipped 5 invalid record(s): 2 missing field 'label' (first at ")
    assert f"{train}:21" in summary


def test_no_valid_records_left(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}, {"text": "y"}])
    with pytest.raises(ToolboxError, match="no valid training records .*skipped 2"):
        load_records("classify", DataSpec(train=str(train), skip_invalid=True, labels=("a", "b")))


def test_csv_tsv_json_parquet_and_their_places(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text('text,label\n"two\nlines",a\nsecond,b\nthird,\n', encoding="utf-8")
    with pytest.raises(ToolboxError, match=r"d\.csv:5: field 'label': empty"):
        load_records("classify", DataSpec(train=str(tmp_path / "d.csv"), eval_fraction=0))
    (tmp_path / "d.tsv").write_text("text\tlabel\nfirst\ta\nsecond\tb\n", encoding="utf-8")
    assert [r["label"] for r in load_records("classify", DataSpec(train=str(tmp_path / "d.tsv"),
                                                                  eval_fraction=0)).train] == ["a", "b"]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x", "label": "a"}, {"text": "y"}]), encoding="utf-8")
    with pytest.raises(ToolboxError, match=r"d\.json item 2: field 'label': missing"):
        load_records("classify", DataSpec(train=str(tmp_path / "d.json"), eval_fraction=0))
    pq.write_table(pa.table({"text": ["x", "y", None], "label": ["a", "b", "a"]}), tmp_path / "d.parquet")
    with pytest.raises(ToolboxError, match=r"d\.parquet row 3: field 'text': missing"):
        load_records("classify", DataSpec(train=str(tmp_path / "d.parquet"), eval_fraction=0))
    # CSV cells hold list fields as JSON
    (tmp_path / "t.csv").write_text('text,entities\n山田が来た,"[[0, 2, ""PER""]]"\n', encoding="utf-8")
    rec = load_records("tag", DataSpec(train=str(tmp_path / "t.csv"), eval_fraction=0)).train[0]
    assert rec["entities"] == [(0, 2, "PER")]


def test_unknown_format_missing_file_and_split_options(tmp_path):
    (tmp_path / "d.txt").write_text("x\n")
    with pytest.raises(ToolboxError, match=r"d\.txt: unknown data format '\.txt'"):
        load_records("classify", DataSpec(train=str(tmp_path / "d.txt")))
    with pytest.raises(ToolboxError, match=r"nope\.jsonl: no such file"):
        load_records("classify", DataSpec(train=str(tmp_path / "nope.jsonl")))
    train = str(write_jsonl(tmp_path / "t.jsonl", CLASSIFY))
    with pytest.raises(ToolboxError, match="--eval-split picks a split of a dataset"):
        load_records("classify", DataSpec(train=train, eval_split="validation"))
    with pytest.raises(ToolboxError, match="--eval and --eval-fraction exclude each other"):
        load_records("classify", DataSpec(train=train, eval=train, eval_fraction=0.1))
    with pytest.raises(ToolboxError, match=r"--eval-fraction must be in \[0, 1\)"):
        load_records("classify", DataSpec(train=train, eval_fraction=1.0))


def test_hugging_face_dataset_directory_with_class_labels(tmp_path):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "emotion": datasets.ClassLabel(names=["joy", "anger"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["嬉しい", "腹が立つ", "楽しい"], "emotion": [0, 1, 0]},
                                            features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["怒った"], "emotion": [1]}, features=features),
    })
    dd.save_to_disk(tmp_path / "emotion")
    spec = DataSpec(train=str(tmp_path / "emotion"), eval_split="validation",
                    fields=Fields(text="sentence", label="emotion"))
    records = load_records("classify", spec)
    assert records.labels == ["anger", "joy"]
    assert records.train[1] == {"text": "腹が立つ", "label": "anger"}
    assert records.eval == [{"text": "怒った", "label": "anger"}]
    with pytest.raises(ToolboxError, match="no split 'test'"):
        load_records("classify", DataSpec(train=str(tmp_path / "emotion"), eval_split="test",
                                          fields=Fields(text="sentence", label="emotion")))


def test_dataset_name_offline_is_one_line_error(tmp_path):
    code = ("from toolbox.finetune.data import DataSpec, load_records\n"
            "from toolbox.errors import ToolboxError\n"
            "try:\n    load_records('classify', DataSpec(train='nobody-here/no-such-dataset'))\n"
            "except ToolboxError as exc:\n    print('ERR', exc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                       env=_clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    line = [x for x in p.stdout.splitlines() if x.startswith("ERR ")]
    assert line and "nobody-here/no-such-dataset [train]" in line[0] and "cache" in line[0], p.stdout + p.stderr


# -- encoding -----------------------------------------------------------------------


def reference_spans(text: str, pieces: list[bytes]) -> list[tuple[int, int]]:
    """Character span of each piece from its UTF-8 bytes: the characters its bytes fall in."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]
    out, pos = [], 0
    for piece in pieces:
        out.append((char_of_byte[pos], char_of_byte[pos + len(piece) - 1] + 1))
        pos += len(piece)
    assert pos == len(text.encode("utf-8"))
    return out


@pytest.mark.parametrize("text", ["𠮷田さんと髙木さんは那覇に住む。", "佐藤翔が🍣を食べた", "Botchan went to 松山.", "猫"])
def test_piece_spans_match_the_pieces_bytes(embedded_tok, text):
    tokens = embedded_tok.tokens(text)
    assert any(embedded_tok.is_byte(t.id) for t in tokens) or text == "猫"
    pieces = [embedded_tok.token_bytes[t.id] for t in tokens]
    assert piece_spans(tokens, len(text)) == reference_spans(text, pieces)


def test_entity_labels_cover_byte_fallback_pieces(embedded_tok):
    text = "昨日、𠮷田修は那覇から来た。"
    entities = [(3, 6, "PER"), (7, 9, "LOC")]
    tokens = embedded_tok.tokens(text)
    names = bio_names(["LOC", "PER"])
    labels, misaligned = align_entities(text, piece_spans(tokens, len(text)), entities, {n: i for i, n in
                                                                                          enumerate(names)})
    assert misaligned == 0
    by_piece = [(embedded_tok.token_bytes[t.id], names[lab]) for t, lab in zip(tokens, labels)]
    # reference: a piece is in an entity when one of its bytes is; the first such piece is B-
    text_bytes = text.encode("utf-8")
    spans_b = [(len(text[:s].encode()), len(text[:e].encode()), kind) for s, e, kind in entities]
    expected, pos, seen = [], 0, set()
    for piece, _ in by_piece:
        hit = next((k for k, (s, e, _) in enumerate(spans_b) if pos < e and pos + len(piece) > s), None)
        if hit is None:
            expected.append("O")
        else:
            expected.append(("I-" if hit in seen else "B-") + spans_b[hit][2])
            seen.add(hit)
        pos += len(piece)
    assert pos == len(text_bytes)
    assert [lab for _, lab in by_piece] == expected
    assert sum(lab != "O" for lab in expected) >= 6  # 𠮷 is four byte pieces, 覇 three


def test_words_and_tags_become_character_spans(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"tokens": ["John", "lives", "in", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC", "I-LOC"]},
        {"tokens": ["山田", "は", "東京", "に"], "tags": ["B-PER", "O", "S-LOC", "O"]},
    ])
    records = load_records("tag", DataSpec(train=str(path), eval_fraction=0))
    first = records.train[0]
    assert first["text"] == "John lives in New York"
    assert [first["text"][s:e] for s, e, _ in first["entities"]] == ["John", "New York"]
    assert records.labels == ["LOC", "PER"]
    japanese = load_records("tag", DataSpec(train=str(path), eval_fraction=0, word_sep="")).train[1]
    assert japanese["text"] == "山田は東京に"
    assert japanese["entities"] == [(0, 2, "PER"), (3, 5, "LOC")]
    assert japanese["units"] == [(0, 2), (2, 3), (3, 5), (5, 6)]


def test_misaligned_entities_are_counted(tmp_path, embedded_tok):
    assert [t.piece for t in embedded_tok.tokens("東京へ")] == ["東京へ"]  # one piece spans entity and particle
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "山田は東京へ行った。", "entities": [[0, 2, "PER"], [3, 5, "LOC"]]}])
    encoded = encode(load_records("tag", DataSpec(train=str(path), eval_fraction=0)), embedded_tok, 64)
    assert encoded.stats["entities"] == 2 and encoded.stats["misaligned_entities"] == 1


def test_classify_encoding_appends_eos_and_truncates(tmp_path, embedded_tok, sp_ref):
    long_text = "吾輩は猫である。" * 20
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "吾輩は猫である。", "label": "a"},
                                              {"text": long_text, "label": "b"}])
    encoded = encode(load_records("classify", DataSpec(train=str(path), eval_fraction=0)), embedded_tok, 16)
    eos = sp_ref.eos_id()
    assert encoded.train[0] == {"input_ids": sp_ref.encode("吾輩は猫である。") + [eos], "labels": 0}
    assert encoded.train[1]["input_ids"] == sp_ref.encode(long_text)[:15] + [eos]
    assert encoded.stats["truncated"] == 1


def test_instruction_records_learn_the_response_only(tmp_path, embedded_tok, sp_ref):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "猫の名前は？", "input": "短く", "output": "まだ無い。\nです"}])
    encoded = encode(load_records("lm", DataSpec(train=str(path), eval_fraction=0)), embedded_tok, 128)
    prompt = sp_ref.encode(chat_prompt([("user", "猫の名前は？\n短く")]))
    response = sp_ref.encode(to_model_text("まだ無い。\nです")) + [sp_ref.eos_id()]
    assert "<NL>" in chat_prompt([("user", "a\nb")])
    (example,) = encoded.train
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [IGNORE] * len(prompt) + response


def test_text_records_are_packed_into_blocks(tmp_path, embedded_tok, sp_ref):
    texts = ["吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。", "何でも薄暗い所で泣いていた。"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    encoded = encode(load_records("lm", DataSpec(train=str(path), eval_fraction=0)), embedded_tok, 8)
    stream = [i for t in texts for i in sp_ref.encode(t) + [sp_ref.eos_id()]]
    blocks = [stream[i : i + 8] for i in range(0, len(stream), 8)]
    assert [x["input_ids"] for x in encoded.train] == [b for b in blocks if len(b) > 1]
    assert all(x["labels"] == x["input_ids"] for x in encoded.train)


def test_an_instruction_without_room_for_its_response_is_dropped(tmp_path, embedded_tok):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "長い質問" * 30, "output": "答え"},
                                              {"instruction": "短い", "output": "答え"}])
    encoded = encode(load_records("lm", DataSpec(train=str(path), eval_fraction=0)), embedded_tok, 16)
    assert len(encoded.train) == 1
    assert encoded.stats["dropped_no_room_for_response"] == 1


def test_package_imports_without_torch():
    code = ("import sys, toolbox.finetune, toolbox.finetune.data, toolbox.finetune.card, toolbox.heads, "
            "toolbox.commands.finetune, toolbox.commands.heads\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_clean_env(),
                       timeout=60)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr
