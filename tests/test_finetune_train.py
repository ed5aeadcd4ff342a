"""`toolbox finetune`: real training runs on the embedded model (CPU, transformers Trainer + peft).

classify: tell 夏目漱石's two novels apart from single sentences (tests/data/finetune);
tag: names and places inserted into Japanese sentences, byte-fallback characters included;
lm: instruction tuning and continued pre-training lower the held-out loss, and the merged
output runs on the `cpu` and `quant` backends. Quality is measured here with the
toolbox's own runtime on held-out data and seqeval, and the merge is checked against
peft's unmerged model in fp32. A crashed run resumed from its checkpoint must end with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _clean_env

from toolbox.registry import EMBEDDED_DIR

# one torch thread: the runs are small, and a busy machine's thread contention slows two threads 3-4x
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"),
              # raised inside transformers when peft loads an adapter (the reference models below)
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
DATA = Path(__file__).parent / "data" / "finetune"
NAMES = ["山田太郎", "佐藤花子", "鈴木一郎", "田中美咲", "高橋健", "伊藤さくら", "渡辺翔", "中村愛", "小林誠", "加藤結衣",
         "𠮷田修", "髙木涼", "吉川蓮", "松本葵"]  # 佐, 翔, 𠮷, 髙 are byte-fallback pieces in the embedded vocabulary
PLACES = ["東京", "大阪", "京都", "札幌", "福岡", "名古屋", "横浜", "神戸", "仙台", "広島", "奈良", "金沢", "那覇", "函館"]
TEMPLATES = ["{P}さんは{L}に行った。", "{L}で{P}に会った。", "昨日、{P}は{L}から帰ってきた。",
             "{P}と{Q}は{L}に住んでいる。", "{L}の駅前で{P}が待っていた。", "{P}の実家は{L}にある。",
             "来週、{L}で{P}と{Q}が話す。", "{L}から{M}まで{P}は歩いた。"]


def entity_sentences(n: int, seed: int) -> list[dict]:
    """Sentences with PER/LOC character-span entities."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fill = dict(zip("PQ", rng.sample(NAMES, 2))) | dict(zip("LM", rng.sample(PLACES, 2)))
        text, entities = "", []
        for part in re.split(r"\{([PQLM])\}", rng.choice(TEMPLATES)):
            if part in fill:
                entities.append([len(text), len(text) + len(fill[part]), "PER" if part in "PQ" else "LOC"])
                part = fill[part]
            text += part
        out.append({"text": text, "entities": entities})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def novels(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """Train and eval files from the fixture: every fifth sentence of each novel is held out."""
    train, held = [], []
    for label in ("neko", "botchan"):
        for i, line in enumerate((DATA / f"{label}.txt").read_text(encoding="utf-8").splitlines()):
            (held if i % 5 == 0 else train).append({"text": line, "label": label})
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", held), held


@pytest.fixture
def ft(invoke, monkeypatch):
    """The CLI with the finetune and head commands registered (as toolbox.cli.COMMANDS will list them)."""
    from toolbox import cli

    for name, target in (("finetune", "toolbox.commands.finetune:finetune"),
                         ("classify", "toolbox.commands.heads:classify"), ("tag", "toolbox.commands.heads:tag")):
        monkeypatch.setitem(cli.COMMANDS, name, target)
    return invoke


def card_metric(card: str, name: str) -> float:
    return float(re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|$", card, re.M).group(1))


# -- classify -----------------------------------------------------------------------


def test_classify_tells_the_novels_apart(tmp_path, ft):
    from toolbox import heads
    from toolbox.finetune.data import DataSpec, load_records

    train, evaluation, held = novels(tmp_path)
    out = tmp_path / "novels"
    result = ft("finetune", "classify", "--train", str(train), "--eval", str(evaluation), "-o", str(out),
                "--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--save-dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and f"wrote {out}" in result.output

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert config["id2label"] == {"0": "botchan", "1": "neko"}
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "spiece.model", "README.md",
                                               "metrics.jsonl", "run.json", "adapter"}
    assert not (out / "checkpoints").exists()
    assert (out / "spiece.model").read_bytes() == (EMBEDDED_DIR / "spiece.model").read_bytes()

    # held-out accuracy, measured with the toolbox's runtime on the exported model: at least 95 %
    runner = heads.load(out)
    predictions = heads.classify(runner, [r["text"] for r in held])
    accuracy = sum(p.label == r["label"] for p, r in zip(predictions, held)) / len(held)
    assert accuracy >= 0.95

    card = (out / "README.md").read_text()
    fingerprint = load_records("classify", DataSpec(train=str(train), eval=str(evaluation))).fingerprint()
    assert fingerprint in card and "**embedded**" in card and "LoRA r=8" in card
    assert card_metric(card, "accuracy") == pytest.approx(accuracy, abs=1e-4)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [0, 1]  # before training and after the epoch
    assert any("loss" in r and "learning_rate" in r for r in log)

    # the merged export equals peft's unmerged model (base + adapter) in fp32
    import torch
    from peft import PeftModel
    from transformers import GPTNeoXForSequenceClassification

    base = GPTNeoXForSequenceClassification.from_pretrained(EMBEDDED_DIR, dtype=torch.float32, num_labels=2,
                                                            pad_token_id=0)
    reference = PeftModel.from_pretrained(base, out / "adapter").eval()
    tok = runner.tokenizer
    for p in predictions[:3] + predictions[-3:]:
        ids = torch.tensor([tok.encode(p.text, eos=True)])
        with torch.no_grad():
            probs = reference(input_ids=ids).logits.softmax(-1)[0]
        assert p.scores["botchan"] == pytest.approx(probs[0].item(), abs=1e-4)


# -- tag ----------------------------------------------------------------------------


def char_tags(text: str, entities) -> list[str]:
    tags = ["O"] * len(text)
    for start, end, label in entities:
        tags[start:end] = [f"B-{label}"] + [f"I-{label}"] * (end - start - 1)
    return tags


def test_tag_finds_names_and_places(tmp_path, ft):
    from seqeval.metrics import f1_score

    from toolbox import heads

    train = write_jsonl(tmp_path / "train.jsonl", entity_sentences(240, seed=1))
    held = entity_sentences(40, seed=2)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", held)
    out = tmp_path / "ner"
    result = ft("finetune", "tag", "--train", str(train), "--eval", str(evaluation), "-o", str(out),
                "--epochs", "2", "--lr", "2e-3")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForTokenClassification"]
    assert sorted(config["label2id"]) == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]

    found = heads.tag(heads.load(out), [r["text"] for r in held])
    gold = [char_tags(r["text"], r["entities"]) for r in held]
    pred = [char_tags(t.text, [(e.start, e.end, e.label) for e in t.entities]) for t in found]
    f1 = f1_score(gold, pred)
    assert f1 >= 0.9  # entity level: type and exact character span
    assert card_metric((out / "README.md").read_text(), "F1 (entity level)") == pytest.approx(f1, abs=1e-4)
    byte_names = [r for r in held if any(n in r["text"] for n in ("𠮷田修", "髙木涼", "佐藤花子", "渡辺翔"))]
    assert byte_names  # sentences whose names start or end in byte-fallback pieces are among those scored

    piped = ft("tag", "--model", str(out), "--json", input=(held[0]["text"] + "\n").encode())
    spans = [[e["start"], e["end"], e["label"]] for e in json.loads(piped.output)["entities"]]
    assert spans == [[s, e, k] for s, e, k in
                     sorted((e.start, e.end, e.label) for e in found[0].entities)]


# -- lm -----------------------------------------------------------------------------


def instruction_records() -> list[dict]:
    places = PLACES + ["長崎", "熊本", "新潟", "静岡"]
    asks = ["{p}について教えてください。", "{p}はどんな町ですか？"]
    return [{"instruction": a.format(p=p), "output": f"{p}は日本の町です。\n{p}には猫がいます。"}
            for p in places for a in asks]


def generate(model: Path, backend: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolbox", "generate", "--model", str(model), "-b", backend,
                           "--greedy", "--max-new-tokens", "8", "--json", "長崎について教えてください。"],
                          capture_output=True, cwd=REPO, env=_clean_env(), timeout=120)


def test_instruction_tuning_lowers_held_out_loss_and_runs_on_cpu_and_quant(tmp_path, ft):
    import torch
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    from toolbox.runtime.model import GPTNeoX

    records = instruction_records()
    train = write_jsonl(tmp_path / "train.jsonl", records[::2] + records[1::4])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", records[3::4])
    out = tmp_path / "sft"
    result = ft("finetune", "lm", "--train", str(train), "--eval", str(evaluation), "-o", str(out),
                "--epochs", "3", "--lr", "2e-3", "--batch-size", "4", "--save-dtype", "float32")
    assert result.exit_code == 0, result.output
    losses = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in r]
    assert len(losses) == 4  # before training, then each epoch
    assert losses[-1] < losses[0] - 1.0  # nats per response token
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    assert config["toolbox"]["prompt_format"] == "rinna-chat"

    # merged weights == peft's unmerged model, compared through the runtime's own forward pass
    ours = GPTNeoX.from_pretrained(out)
    base = GPTNeoXForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 300, 42, 1000, 7, 4, 99]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        reference = PeftModel.from_pretrained(base, out / "adapter").eval()
        merged = ours.forward_full(ids)
        torch.testing.assert_close(merged, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert (merged - before).abs().max() > 0.1  # the adapters did change the model

    for backend in ("cpu", "quant"):
        p = generate(out, backend)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        record = json.loads(p.stdout.decode().strip().splitlines()[-1])
        assert record["completion_tokens"] > 0


def test_full_continued_pretraining_on_english(tmp_path, ft):
    lines = (DATA / "botchan.txt").read_text(encoding="utf-8").splitlines()
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in lines[:240]])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in lines[240:]])
    out = tmp_path / "cpt"
    result = ft("finetune", "lm", "--full", "--train", str(train), "--eval", str(evaluation), "-o", str(out),
                "--epochs", "1", "--lr", "1e-3", "--max-length", "128", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5
    assert not (out / "adapter").exists()
    assert "full fine-tuning" in (out / "README.md").read_text()
    p = generate(out, "cpu")
    assert p.returncode == 0, p.stderr.decode()[-2000:]


# -- resume -------------------------------------------------------------------------


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, ft):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from toolbox.errors import ToolboxError
    from toolbox.finetune.data import DataSpec
    from toolbox.finetune.train import TrainSettings, run

    train, evaluation, _ = novels(tmp_path)
    lines = [json.loads(x) for x in train.read_text().splitlines()]
    small = write_jsonl(tmp_path / "small.jsonl", lines[:24] + lines[-24:])
    data = DataSpec(train=str(small), eval_fraction=0.25)
    settings = dict(task="classify", epochs=2, save_steps=4, batch_size=4, learning_rate=1e-3)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise RuntimeError("power cut")

    run(TrainSettings(output=tmp_path / "whole", **settings), data)
    broken = tmp_path / "broken"
    with pytest.raises(ToolboxError, match=r"training stopped at step 6 \(power cut\); the last checkpoint "
                                           r"\(checkpoint-4\) is kept: rerun with --resume"):
        run(TrainSettings(output=broken, **settings), data, callbacks=[Crash()])
    # a checkpoint cut short while saving (no trainer_state.json) is passed over
    (broken / "checkpoints" / "checkpoint-5").mkdir()
    (broken / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"partial")

    args = ["finetune", "classify", "--train", str(small), "--eval-fraction", "0.25", "-o", str(broken),
            "--epochs", "2", "--save-steps", "4", "--batch-size", "4", "--lr", "1e-3"]
    changed = ft(*args[:-1], "2e-3", "--resume")
    assert changed.exit_code == 1
    assert changed.output.startswith("Error: --resume: setting learning_rate is 0.002 here but 0.001 in the run in")
    resumed = ft(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output

    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(broken / "model.safetensors")
    assert whole.keys() == again.keys()
    for name in whole:
        assert (whole[name] == again[name]).all(), name
    steps = [r["step"] for r in map(json.loads, (broken / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps)  # the log kept up to the checkpoint, then continued
    finished = ft(*args, "--resume")
    assert finished.exit_code == 1 and "that run has finished" in finished.output


def test_early_stopping_and_skipped_records(tmp_path, ft):
    train, _, _ = novels(tmp_path)
    lines = [json.loads(x) for x in train.read_text().splitlines()]
    small = write_jsonl(tmp_path / "small.jsonl", [*lines[:30], {"text": "ラベルなし"}, *lines[-30:]])
    out = tmp_path / "early"
    result = ft("finetune", "classify", "--train", str(small), "--eval-fraction", "0.3", "-o", str(out),
                "--epochs", "6", "--patience", "1", "--batch-size", "8", "--lr", "2e-3", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert f"note: skipped 1 invalid record(s): 1 missing field 'label' (first at {small}:31)" in result.output
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    epochs = [r["epoch"] for r in rows if not r.get("final")]
    f1 = [r["eval_macro_f1"] for r in rows if not r.get("final")]
    # stopped after the first evaluation that did not beat the best (patience 1), well before epoch 6
    assert epochs[-1] < 6 and f1[-1] <= max(f1[:-1])
    assert rows[-1]["final"] and rows[-1]["eval_macro_f1"] == max(f1)  # the best checkpoint is the export
    card = (out / "README.md").read_text()
    assert "skipped 1 invalid record(s)" in card and "patience 1 on macro_f1" in card


# -- bad input and settings (no training) -------------------------------------------


def test_bad_record_through_the_cli_is_one_line(tmp_path, ft):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}])
    result = ft("finetune", "classify", "--train", str(path), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output == f"Error: {path}:3: field 'label': missing\n"
    assert not (tmp_path / "out").exists()


def test_output_and_option_errors(tmp_path, ft):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"文{i}", "label": "ab"[i % 2]} for i in range(10)])
    base = ["finetune", "classify", "--train", str(path)]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    cases = [
        ([*base, "-o", str(occupied)], "is not empty: --resume continues the run in it, --overwrite starts over"),
        ([*base, "-o", str(occupied), "--overwrite"], "holds files that toolbox finetune did not write"),
        ([*base, "-o", str(tmp_path / "new"), "--resume"], "nothing to resume"),
        ([*base, "-o", str(tmp_path / "x"), "--eval-fraction", "0", "--patience", "2"], "--patience needs evaluation"),
        ([*base, "-o", str(tmp_path / "x"), "--patience", "2", "--save-steps", "5"], "drop --save-steps"),
        ([*base, "-o", str(tmp_path / "x"), "--max-length", "4096"], "exceeds the model's context of 512"),
        ([*base, "-o", str(tmp_path / "x"), "--bf16", "--device", "cpu"], "--bf16 needs a CUDA device"),
        ([*base, "-o", str(tmp_path / "x"), "--resume", "--overwrite"], "exclude each other"),
    ]
    for args, fragment in cases:
        result = ft(*args)
        assert result.exit_code == 1, (args, result.output)
        last = result.output.strip().splitlines()[-1]  # (torch may log its own warnings on import before it)
        assert last.startswith("Error: ") and fragment in last, (args, result.output)
        assert "Traceback" not in result.output
    assert (occupied / "notes.txt").read_text() == "mine"
