"""Cut the novels fixture (neko.txt, botchan.txt) from the two public-domain novels.

Run once by hand: `python tests/data/finetune/make_fixture.py /work/shared/data`. The tests
read only the files this writes, never the novels themselves.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

COUNT = 300
HERE = Path(__file__).parent


def neko_sentences(text: str) -> list[str]:
    """Sentences of the Aozora text: header/footer, ruby, ruby markers and editor notes removed."""
    body = text.split("-" * 55)[2]
    body = body.split("底本：")[0]
    body = re.sub(r"《[^》]*》|［＃[^］]*］|｜", "", body)
    out = []
    for para in body.splitlines():
        for sentence in re.findall(r"[^。]+。", para.strip().lstrip("　")):
            if 12 <= len(sentence) <= 40 and not re.search(r"[「」『』（）—…]", sentence):
                out.append(sentence)
    return out


def botchan_sentences(text: str) -> list[str]:
    """Sentences of the Gutenberg text: license header/footer and the translator's note removed."""
    body = text.split("*** START OF THIS PROJECT GUTENBERG EBOOK")[1].split("*** END OF THIS PROJECT")[0]
    body = body[body.index("CHAPTER I") :]
    flat = re.sub(r"\s+", " ", body)
    out = []
    for sentence in re.findall(r"[A-Z][^.!?\"]*[.!?]", flat):
        if 30 <= len(sentence) <= 110 and "CHAPTER" not in sentence:
            out.append(sentence)
    return out


def evenly(items: list[str], n: int) -> list[str]:
    """n items spread evenly over the book (so both halves of every split see all of it)."""
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def main(source: Path) -> None:
    neko = neko_sentences((source / "wagahaiwa_nekodearu.txt").read_text(encoding="utf-8"))
    botchan = botchan_sentences((source / "botchan.txt").read_text(encoding="utf-8-sig"))
    for name, sentences in (("neko.txt", neko), ("botchan.txt", botchan)):
        (HERE / name).write_text("\n".join(evenly(sentences, COUNT)) + "\n", encoding="utf-8")
        print(f"{name}: {COUNT} of {len(sentences)} candidate sentences")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
