"""Build the toy "embedded" model shipped in ``toolbox/data/embedded/``.

The embedded model is a miniature of rinna's japanese-gpt-neox-3.6b series,
trained from scratch on Natsume Soseki's 吾輩は猫である (public domain, Aozora
Bunko). It lets the toolbox and its tests run offline without the 7 GB
checkpoint; it is not a useful language model.

Run from the repository root::

    python scripts/build_embedded_model.py [TEXT] [OUTDIR]

TEXT defaults to ``../shared/data/wagahaiwa_nekodearu.txt`` and OUTDIR to
``toolbox/data/embedded``. Needs torch, sentencepiece and transformers (the
``test`` extra). Runtime is almost all training, a fixed 600 steps (TRAIN
below): 1.1-1.3 s a step on an idle 2-core CPU, so 12-15 minutes; the shipped
build took 21 minutes on a machine shared with other jobs.

What it does:

1. Cleans the Aozora text: CRLF -> LF, drops the header and the 底本 footer,
   ruby 《...》, the ruby marker ｜ and editor notes ［＃...］ (with a ※
   right before one).
2. Trains a sentencepiece unigram tokenizer (vocab 8000) with the series'
   conventions: byte fallback, no dummy prefix, whitespace kept, ids
   pad 0 / unk 1 / bos 2 / eos 3, plus ``<NL>`` as piece 4. The normalization
   is ``identity`` so every line round-trips exactly. Training is
   deterministic: two runs give byte-identical models (checked; note that
   num_threads is recorded in the model, so changing it changes the bytes).
3. Trains a 4-layer GPT-NeoX (hidden 256, 4 heads, parallel residual, full
   rotary, untied embeddings) on the novel encoded the way the pretrained
   model sees text: lines joined with "\\n", which becomes the byte piece
   ``<0x0A>`` (not ``<NL>``). fp32 on CPU, seed 0, AdamW, warmup + cosine,
   dropout 0.2. The last 2% of tokens are held out for validation; its loss
   bottoms out near step 300 and creeps up afterwards as the model starts to
   memorize the novel.
4. Saves config.json, model.safetensors (float16), spiece.model and a README.md
   model card, the layout of the real checkpoints, plus tokenizer.json,
   tokenizer_config.json and special_tokens_map.json written from spiece.model by
   ``toolbox.hf_tokenizer`` so that transformers tokenizes as sentencepiece does.

The text itself is never written anywhere: the tokenizer trainer reads the
lines from memory, which also keeps the saved spiece.model byte-identical
between runs (a file input would record its temporary path in the model).
"""

import copy
import io
import json
import math
import re
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from toolbox.hf_tokenizer import write_tokenizer_files

SEED = 0
SEQ_LEN = 256
VAL_FRACTION = 0.02
TRAIN = dict(steps=600, batch=16, lr=1e-3, warmup=50, min_lr_ratio=0.1, weight_decay=0.1, clip=1.0)
ARCH = dict(
    vocab_size=8000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    rotary_pct=1.0,
    rotary_emb_base=10000,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    max_position_embeddings=512,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=0,
    hidden_dropout=0.2,  # the novel is small; dropout acts only in training
)
SPM = dict(
    model_type="unigram",
    vocab_size=ARCH["vocab_size"],
    byte_fallback=True,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    pad_id=0,
    pad_piece="[PAD]",
    unk_id=1,
    unk_piece="<unk>",
    bos_id=2,
    bos_piece="<s>",
    eos_id=3,
    eos_piece="</s>",
    user_defined_symbols=["<NL>"],
    max_sentence_length=1 << 20,  # the longest line is 33 KB; longer ones would be skipped silently
    character_coverage=0.9995,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    num_threads=2,
)
# Keys the real checkpoints have at the top level of config.json.
TOP_LEVEL_KEYS = (
    "rotary_pct", "rotary_emb_base", "use_parallel_residual", "max_position_embeddings", "hidden_size",
    "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size", "layer_norm_eps",
    "tie_word_embeddings",
)
PROMPTS = ("吾輩は猫である。", "どこで生れたか", "主人は", "「君、")
SAMPLE_TOKENS = 40


def clean_aozora(raw: str) -> list[str]:
    """Return the novel's body lines without Aozora markup."""
    lines = raw.replace("\r\n", "\n").split("\n")
    rulers = [i for i, line in enumerate(lines) if line.startswith("-----")]
    footer = next(i for i, line in enumerate(lines) if line.startswith("底本："))
    body = "\n".join(lines[rulers[1] + 1 : footer])
    body = re.sub(r"《[^》]*》", "", body)
    body = re.sub(r"※?［＃[^］]*］", "", body)
    body = body.replace("｜", "")
    return body.strip("\n").split("\n")


def train_tokenizer(lines: list[str], outdir: Path) -> spm.SentencePieceProcessor:
    # Feeding lines from memory keeps temporary paths out of the saved trainer spec,
    # so the model file is byte-identical from run to run.
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, minloglevel=2, **SPM)
    (outdir / "spiece.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.piece_to_id("<NL>") == 4, "<NL> must be a single piece with id 4"
    assert all(sp.decode(sp.encode(line)) == line for line in lines), "tokenizer must round-trip"
    return sp


def encode_novel(sp: spm.SentencePieceProcessor, lines: list[str]) -> torch.Tensor:
    """Encode the novel as the pretrained model would see it: newlines as the byte piece <0x0A>."""
    text = "\n".join(lines)
    ids = sp.encode(text)
    newline = sp.piece_to_id("<0x0A>")
    assert ids.count(newline) == text.count("\n") and sp.decode(ids) == text
    print(f"{len(text):,} characters -> {len(ids):,} tokens; newline = <0x0A> id {newline}")
    return torch.tensor(ids)


def lr_factor(step: int) -> float:
    """Linear warmup, then cosine decay down to min_lr_ratio."""
    if step < TRAIN["warmup"]:
        return (step + 1) / TRAIN["warmup"]
    progress = (step - TRAIN["warmup"]) / max(1, TRAIN["steps"] - TRAIN["warmup"])
    floor = TRAIN["min_lr_ratio"]
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model: GPTNeoXForCausalLM, val: torch.Tensor) -> float:
    model.eval()
    chunks = val[: len(val) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    losses = [model(input_ids=batch, labels=batch).loss.item() for batch in chunks.split(TRAIN["batch"])]
    model.train()
    return sum(losses) / len(losses)  # batches hold equal token counts except possibly the last


def train_model(ids: torch.Tensor) -> tuple[GPTNeoXForCausalLM, float, float]:
    """Train on random 256-token windows of the first 98%; return model, val loss, seconds."""
    split = int(len(ids) * (1 - VAL_FRACTION))
    train, val = ids[:split], ids[split:]
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**ARCH))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train):,} train / {len(val):,} validation tokens")
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    offsets = torch.arange(SEQ_LEN)
    model.train()
    start = time.perf_counter()
    for step in range(TRAIN["steps"]):
        starts = torch.randint(0, len(train) - SEQ_LEN, (TRAIN["batch"], 1))
        batch = train[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == TRAIN["steps"] - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{elapsed:6.0f} s ({elapsed / (step + 1):.2f} s/step)", flush=True)
        if step % 100 == 99:
            print(f"  validation loss {validation_loss(model, val):.3f}", flush=True)
    seconds = time.perf_counter() - start
    val_loss = validation_loss(model, val)
    return model.eval(), val_loss, seconds


@torch.no_grad()
def greedy_samples(model: GPTNeoXForCausalLM, sp: spm.SentencePieceProcessor) -> list[tuple[str, str]]:
    samples = []
    for prompt in PROMPTS:
        ids = torch.tensor([sp.encode(prompt)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=SAMPLE_TOKENS, pad_token_id=ARCH["pad_token_id"])
        samples.append((prompt, sp.decode(out[0, ids.shape[1]:].tolist())))
    return samples


def save_model(model: GPTNeoXForCausalLM, outdir: Path) -> None:
    """Save fp16 weights and a config.json with the series' keys at top level.

    transformers 5 writes rotary_pct and rotary_emb_base only inside rope_parameters
    (as partial_rotary_factor and rope_theta); the real checkpoints have them at top level.
    """
    copy.deepcopy(model).half().save_pretrained(outdir)
    (outdir / "generation_config.json").unlink(missing_ok=True)  # the real checkpoints have none
    (outdir / "model.safetensors").chmod(0o644)  # save_pretrained writes 0600: unreadable once installed
    config_path = outdir / "config.json"
    config = json.loads(config_path.read_text())
    for key in TOP_LEVEL_KEYS:
        config.setdefault(key, ARCH[key])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(outdir, outdir / "spiece.model")


@torch.no_grad()
def reload_and_compare(model: GPTNeoXForCausalLM, outdir: Path, ids: torch.Tensor) -> GPTNeoXForCausalLM:
    """Reload the saved checkpoint; its logits must match the fp32 model's up to fp16 rounding."""
    loaded = GPTNeoXForCausalLM.from_pretrained(outdir, dtype=torch.float32).eval()
    sample = ids[None, :SEQ_LEN]
    expected, actual = model(sample).logits, loaded(sample).logits
    diff = (actual - expected).abs().max().item()
    agree = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"reloaded checkpoint: max logit difference {diff:.4f}, same argmax for {agree:.1%} of positions")
    assert diff < 0.1 and agree > 0.98, "reloaded checkpoint does not match the trained model"
    return loaded


def write_card(outdir: Path, n_tokens: int, val_loss: float, seconds: float, samples) -> None:
    sample_lines = "\n".join(f"- `{prompt}` → `{text}`".replace("\n", "⏎") for prompt, text in samples)
    arch = ", ".join(f"{k}={v}" for k, v in ARCH.items())
    train = ", ".join(f"{k}={v}" for k, v in TRAIN.items())
    (outdir / "README.md").write_text(f"""# Embedded toy model (rinna GPT-NeoX layout)

A tiny GPT-NeoX causal LM with a sentencepiece tokenizer, in the file layout of
rinna's japanese-gpt-neox-3.6b checkpoints. It exists so the toolbox and its tests
can run offline. **It is a toy, not a useful language model.**

## Provenance

Trained from scratch on 夏目漱石『吾輩は猫である』 (Natsume Soseki, *I Am a Cat*),
public domain, from Aozora Bunko (青空文庫), with the Aozora header, footer, ruby and
editor notes removed. Built by `scripts/build_embedded_model.py`.

## Tokenizer (`spiece.model`)

sentencepiece unigram, vocab {SPM["vocab_size"]}, byte fallback, no dummy prefix, whitespace
kept, identity normalization (lines round-trip exactly), split digits, character
coverage {SPM["character_coverage"]}. Ids: `[PAD]` 0, `<unk>` 1, `<s>` 2, `</s>` 3, `<NL>` 4.
The model was trained on lines joined with a newline, which encodes as the byte piece
`<0x0A>`; `<NL>` exists in the vocabulary but was never seen in training.
`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` describe the same
tokenizer for transformers (`AutoTokenizer` gives sentencepiece's ids; see the toolbox's
docs/tokenizer.md).

## Model

GPTNeoXForCausalLM: {arch}.
Weights stored in float16 (`model.safetensors`).

Training: {n_tokens:,} tokens, random {SEQ_LEN}-token windows from the first
{100 - VAL_FRACTION * 100:g}% of the novel; AdamW with linear warmup and cosine decay:
{train}; fp32 on CPU, seed {SEED}, {seconds / 60:.1f} minutes on 2 CPU cores.

Validation (last {VAL_FRACTION * 100:g}% of the tokens): loss {val_loss:.3f},
perplexity {math.exp(val_loss):.1f}.

## Greedy samples ({SAMPLE_TOKENS} new tokens, from the saved fp16 weights; ⏎ marks a newline)

{sample_lines}
""", encoding="utf-8")


def main(text_path: str = "../shared/data/wagahaiwa_nekodearu.txt", outdir: str = "toolbox/data/embedded") -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    lines = clean_aozora(Path(text_path).read_text(encoding="utf-8"))
    print(f"cleaned text: {len(lines):,} lines, {sum(map(len, lines)) + len(lines) - 1:,} characters")
    sp = train_tokenizer(lines, out)
    ids = encode_novel(sp, lines)
    model, val_loss, seconds = train_model(ids)
    print(f"training took {seconds / 60:.1f} min; validation loss {val_loss:.3f}, "
          f"perplexity {math.exp(val_loss):.1f}")
    save_model(model, out)
    samples = greedy_samples(reload_and_compare(model, out, ids), sp)
    write_card(out, len(ids), val_loss, seconds, samples)
    print("greedy samples:")
    for prompt, text in samples:
        print(f"  {prompt} -> {text!r}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:24s} {path.stat().st_size:>12,} bytes")
    print(f"total size of {out}: {sum(p.stat().st_size for p in out.iterdir()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
