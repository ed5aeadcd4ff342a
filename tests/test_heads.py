"""Fine-tuned heads on the project's runtime (toolbox.runtime.heads, toolbox.heads) and their commands.

The reference is transformers' own GPTNeoXForSequenceClassification (``score``, no bias,
read at the last non-pad token) and GPTNeoXForTokenClassification (``classifier`` with
bias, every token) in fp32, on random checkpoints written here with the embedded
tokenizer, and token ids from sentencepiece itself.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from toolbox.errors import ToolboxError
from toolbox.heads import Entity, decode_entities, head_task
from toolbox.registry import EMBEDDED_DIR

CLASSES = ["joy", "anger", "sadness"]
TAGS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
SHAPE = dict(vocab_size=8000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def build_head(kind: str, path, rotary_pct=1.0, parallel=True, seed=0):
    """A random transformers head model (fp32, eval), saved with the embedded tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, GPTNeoXForTokenClassification

    torch.manual_seed(seed)
    labels = CLASSES if kind == "classify" else TAGS
    config = GPTNeoXConfig(**SHAPE, rotary_pct=rotary_pct, use_parallel_residual=parallel, initializer_range=0.2,
                           id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    cls = GPTNeoXForSequenceClassification if kind == "classify" else GPTNeoXForTokenClassification
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    shutil.copy(EMBEDDED_DIR / "spiece.model", path / "spiece.model")
    return model


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    models = {}
    for kind in ("classify", "tag"):
        models[kind] = build_head(kind, root / kind)
    return root, models


def ragged(seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 12, 1]
    return [torch.randint(4, 8000, (n,), generator=g).tolist() for n in lengths]


def padded(batch):
    width = max(map(len, batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["classify", "tag"])
@pytest.mark.parametrize("rotary_pct, parallel", [(1.0, True), (0.25, False)])
def test_runtime_heads_match_transformers_fp32(tmp_path, kind, rotary_pct, parallel):
    from toolbox.runtime.heads import HeadModel

    reference = build_head(kind, tmp_path, rotary_pct, parallel)
    ours = HeadModel.from_pretrained(tmp_path)
    assert ours.task == kind and ours.labels == (CLASSES if kind == "classify" else TAGS)
    batch = ragged()
    ids, mask = padded(batch)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask.sum(-1))
    if kind == "classify":
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:
        for i, seq in enumerate(batch):
            torch.testing.assert_close(got[i, : len(seq)], expected[i, : len(seq)], rtol=1e-4, atol=1e-5)


def test_classify_texts_match_transformers_on_sentencepiece_ids(heads_dir, sp_ref):
    from toolbox import heads

    root, models = heads_dir
    texts = ["吾輩は猫である。", "名前はまだ無い。どこで生れたかとんと見当がつかぬ。", "🍣", "I am a cat."]
    runner = heads.load(root / "classify", batch_size=3)
    results = heads.classify(runner, texts)
    for text, result in zip(texts, results):
        ids = torch.tensor([sp_ref.encode(text) + [sp_ref.eos_id()]])
        with torch.no_grad():
            probs = models["classify"](input_ids=ids).logits.softmax(-1)[0].tolist()
        expected = dict(zip(CLASSES, probs))
        assert result.text == text
        assert result.label == max(expected, key=expected.get)
        assert list(result.scores) == sorted(expected, key=expected.get, reverse=True)
        for label, p in expected.items():
            assert result.scores[label] == pytest.approx(p, abs=1e-5)
        assert result.score == pytest.approx(max(probs), abs=1e-5)
    single = heads.classify(runner, texts[1])
    assert single.scores == pytest.approx(results[1].scores, abs=1e-5)


def test_tag_batches_equal_single_texts(heads_dir):
    from toolbox import heads

    root, _ = heads_dir
    runner = heads.load(root / "tag", batch_size=2)
    texts = ["𠮷田さんは那覇に住む。", "", "東京", "昨日、佐藤翔が大阪から帰ってきた。山田も来た。"]
    together = heads.tag(runner, texts)
    assert together[1].entities == []
    for text, result in zip(texts, together):
        alone = heads.tag(runner, text)
        assert [(e.start, e.end, e.label) for e in alone.entities] == [(e.start, e.end, e.label)
                                                                      for e in result.entities]
        for e in result.entities:
            assert e.text == text[e.start : e.end] and e.text.strip() == e.text and 0 < e.score <= 1


def test_decode_entities_hand_cases():
    text = "AB CD EF"
    spans = [(0, 1), (1, 2), (2, 4), (4, 5), (5, 7), (7, 8)]  # "A" "B" " C" "D" " E" "F"
    labels = ["B-PER", "I-PER", "I-PER", "O", "I-LOC", "B-LOC"]
    got = decode_entities(text, spans, labels, [0.5, 0.7, 0.9, 0.1, 0.4, 0.6])
    assert got == [Entity(0, 4, "PER", "AB C", pytest.approx(0.7)),  # space-led piece: span keeps no outer space
                   Entity(6, 7, "LOC", "E", 0.4),  # I- after O starts an entity; its leading space is dropped
                   Entity(7, 8, "LOC", "F", 0.6)]  # B- starts a new one
    # byte-fallback pieces of one character share its span and count once (by the first)
    text = "x𠮷y"
    spans = [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2), (2, 3)]
    got = decode_entities(text, spans, ["O", "B-PER", "O", "B-LOC", "O", "I-PER"], [1, 0.8, 0.2, 0.2, 0.2, 0.6])
    assert [(e.start, e.end, e.label, e.text) for e in got] == [(1, 3, "PER", "𠮷y")]
    # IOBES: E- and S- close their entity
    got = decode_entities("abc", [(0, 1), (1, 2), (2, 3)], ["S-X", "B-X", "E-X"], [1, 1, 1])
    assert [(e.start, e.end) for e in got] == [(0, 1), (1, 3)]


def test_head_task_and_load_errors(heads_dir, tmp_path, sp_ref):
    from toolbox import heads

    root, _ = heads_dir
    assert head_task(root / "classify") == "classify" and head_task(root / "tag") == "tag"
    assert head_task(EMBEDDED_DIR) is None and head_task(tmp_path) is None
    with pytest.raises(ToolboxError, match="is not a classification or tagging model"):
        heads.load(str(EMBEDDED_DIR))
    with pytest.raises(ToolboxError, match="is a tag model; use `toolbox tag`"):
        heads.classify(str(root / "tag"), ["x"])
    n = len(sp_ref.encode("長い文章です。" * 20)) + 1  # with </s>
    with pytest.raises(ToolboxError, match=rf"texts\[1\]: {n} tokens exceed the model's context of 64"):
        heads.classify(str(root / "classify"), ["短い", "長い文章です。" * 20])
    with pytest.raises(ToolboxError, match=r"texts\[0\]: expected a string"):
        heads.tag(str(root / "tag"), [3])
    broken = tmp_path / "broken"
    shutil.copytree(root / "classify", broken)
    config = json.loads((broken / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}  # the head has three rows
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ToolboxError, match=r"cannot load .*head weight \(3, 64\) does not match 2 labels"):
        heads.load(str(broken))


@pytest.fixture
def head_cli(invoke, monkeypatch):
    """The CLI with the head commands registered (as toolbox.cli.COMMANDS will list them)."""
    from toolbox import cli

    monkeypatch.setitem(cli.COMMANDS, "classify", "toolbox.commands.heads:classify")
    monkeypatch.setitem(cli.COMMANDS, "tag", "toolbox.commands.heads:tag")
    return invoke


def test_classify_command_arguments_stdin_and_json(heads_dir, head_cli):
    from toolbox import heads

    root, _ = heads_dir
    expected = heads.classify(str(root / "classify"), ["吾輩は猫である。", "I am a cat."])
    result = head_cli("classify", "--model", str(root / "classify"), "--json", "吾輩は猫である。", "I am a cat.")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["line"] for r in records] == [1, 2]
    assert [r["label"] for r in records] == [e.label for e in expected]
    assert records[0]["scores"] == pytest.approx(expected[0].scores, abs=1e-6)
    piped = head_cli("classify", "--model", str(root / "classify"), "--json",
                     input="吾輩は猫である。\n\nI am a cat.\n".encode())
    assert [json.loads(line)["line"] for line in piped.output.splitlines()] == [1, 3]
    table = head_cli("classify", "--model", str(root / "classify"), "--all-labels", "吾輩は猫である。")
    assert expected[0].label in table.output and "probability" in table.output and "sadness" in table.output


def test_tag_command_json_spans(heads_dir, head_cli):
    from toolbox import heads

    root, _ = heads_dir
    text = "𠮷田さんは那覇に住む。"
    result = head_cli("tag", "--model", str(root / "tag"), "--json", input=(text + "\n").encode())
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.output.splitlines()]
    assert record["text"] == text
    assert record["entities"] == [e.to_dict() for e in heads.tag(str(root / "tag"), text).entities]
    table = head_cli("tag", "--model", str(root / "tag"), text)
    assert "span" in table.output and "entity" in table.output


def test_commands_refuse_other_models(head_cli, heads_dir):
    root, _ = heads_dir
    result = head_cli("classify", "--model", str(EMBEDDED_DIR), "x")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "not a classification or tagging model" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = head_cli("tag", "--model", str(root / "classify"), "x")
    assert result.exit_code == 1 and "is a classify model; use `toolbox classify`" in result.output
    result = head_cli("tag", "--model", str(root / "tag"), input=("短い\n\n" + "長い文章です。" * 20 + "\n").encode())
    assert result.exit_code == 1
    assert result.output.startswith("Error: stdin line 3: ") and "exceed the model's context of 64" in result.output


def test_the_library_loads_heads_as_models(heads_dir):
    """`toolbox.load` on a head checkpoint gives a model whose classify/tag equal `toolbox.heads`',
    and whose language-model methods say what to use instead."""
    import toolbox
    from toolbox import heads

    root, _ = heads_dir
    texts = ["吾輩は猫である。", "名前はまだ無い。"]
    classifier = toolbox.load(str(root / "classify"), threads=1)
    assert classifier.task == "classify" and "classify" in repr(classifier)
    direct = heads.classify(heads.load(root / "classify", threads=1), texts)
    assert [c.to_dict() for c in classifier.classify(texts)] == [c.to_dict() for c in direct]
    with pytest.raises(toolbox.ToolboxError, match="classify model, not a language model"):
        classifier.generate("猫")
    with pytest.raises(toolbox.ToolboxError, match="classify model"):
        classifier.tag("猫")
    tagger = toolbox.load(str(root / "tag"), threads=1)
    assert tagger.tag(texts[0]).to_dict() == heads.tag(heads.load(root / "tag", threads=1), texts[0]).to_dict()
    with pytest.raises(toolbox.ToolboxError, match="language model; classify needs"):
        toolbox.load(threads=1).classify("猫")
    with pytest.raises(toolbox.ToolboxError, match="cpu or cuda"):
        toolbox.load(str(root / "tag"), backend="quant")


def test_the_server_answers_with_the_head(heads_dir):
    """/v1/classify, /v1/tag and the Azure ML /score answer with the task's results; generation is refused."""
    import asyncio

    import httpx

    import toolbox
    from toolbox.serving.app import create_app

    root, _ = heads_dir

    async def post(app, path, body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return await client.post(path, json=body)

    model = toolbox.load(str(root / "classify"), threads=1)
    app = create_app(model)
    texts = ["吾輩は猫である。", "名前はまだ無い。"]
    expected = [c.to_dict() for c in model.classify(texts)]
    r = asyncio.run(post(app, "/v1/classify", {"texts": texts}))
    assert r.status_code == 200 and r.json()["results"] == expected
    r = asyncio.run(post(app, "/score", {"input_data": {"input_string": texts}}))
    assert r.status_code == 200 and r.json() == expected
    r = asyncio.run(post(app, "/v1/tag", {"texts": texts}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_type"
    r = asyncio.run(post(app, "/v1/completions", {"prompt": "猫"}))
    assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]
    tagger = toolbox.load(str(root / "tag"), threads=1)
    r = asyncio.run(post(create_app(tagger), "/v1/tag", {"texts": texts}))
    assert r.json()["results"] == [t.to_dict() for t in tagger.tag(texts)]
