"""Cut the eval test fixtures from the two public-domain novels in ../shared/data.

Run by hand from the project root (`python tests/data/eval/cut.py ../shared/data`); the
tests read only the files this writes. Deterministic: the same novels give the same files.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent


def aozora_paragraphs(path: Path) -> list[str]:
    """Paragraphs of an Aozora Bunko text without its ruby and editor notes."""
    text = path.read_text(encoding="utf-8")
    body = text.split("-------------------------------------------------------")[2]
    body = body.split("底本：")[0]
    body = re.sub(r"《[^》]*》|｜|［＃[^］]*］", "", body)
    return [line.strip("　 \r") for line in body.splitlines() if line.startswith("　")]


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.findall(r"[^。]*。", paragraph) if len(s) > 1]


def main(shared: Path) -> None:
    paragraphs = aozora_paragraphs(shared / "wagahaiwa_nekodearu.txt")
    summary = []
    for p in paragraphs:
        ss = sentences(p)
        if 80 <= len(p) <= 220 and len(ss) >= 3 and "「" not in p:
            summary.append({"id": f"neko-{len(summary):03d}", "paragraph": p, "first_sentence": ss[0]})
        if len(summary) == 24:
            break
    pool = [s for p in paragraphs[:400] for s in sentences(p) if 8 <= len(s) <= 60 and "「" not in s]
    rng = random.Random(0)
    choice = []
    for p in paragraphs:
        ss = [s for s in sentences(p) if 8 <= len(s) <= 60]
        if len(ss) >= 2 and "「" not in p:
            context, true = ss[0], ss[1]
            distractors = rng.sample([s for s in pool if s not in (context, true)], 3)
            label = rng.randrange(4)
            options = distractors[:label] + [true] + distractors[label:]
            choice.append({"id": f"next-{len(choice):03d}", "context": context, "choices": options, "label": label})
        if len(choice) == 24:
            break
    english = []
    text = (shared / "botchan.txt").read_text(encoding="utf-8-sig")
    body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("*** END OF THIS PROJECT")[0]
    body = " ".join(body[body.index("CHAPTER I"):].split()[2:])
    ss = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", body) if 30 <= len(s) <= 200 and '"' not in s]
    for i in range(0, len(ss) - 3, 9):
        english.append({"id": f"botchan-{len(english):03d}", "paragraph": " ".join(ss[i : i + 3]),
                        "first_sentence": ss[i]})
        if len(english) == 12:
            break
    for name, rows in (("neko_summary.jsonl", summary), ("neko_next.jsonl", choice),
                       ("botchan_summary.jsonl", english)):
        with open(OUT / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
