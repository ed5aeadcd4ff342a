"""`toolbox score`: log-likelihood and perplexity per token, per text and per corpus."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from toolbox.commands.options import (
    ModelChoice,
    errors_option,
    model_load_options,
    nl_option,
    stdin_bytes,
    stdout_bytes,
)
from toolbox.errors import ToolboxError
from toolbox.textio import decode_line, read_whole

GROUP_CHARS = 32768  # texts are scored in groups of about this many characters (~tokens)

# Surprisal (-log p, nats) -> style; the last bucket catches everything above.
SURPRISAL_STYLES = ((1.0, "green"), (3.0, ""), (6.0, "yellow"), (10.0, "bold red"), (float("inf"), "bold white on red"))


# -- input --------------------------------------------------------------------------


@dataclass
class Text:
    """One text to score and where it came from."""

    source: str  # "argument", "stdin", or a path
    line: int | None  # line number for line-based input, argument number for arguments
    text: str
    nbytes: int = 0  # input bytes it stands for (progress)
    whole: bool = False  # a whole document (file, --whole): its text is not echoed in JSON

    @property
    def where(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass
class Inputs:
    """Reads texts from one kind of input, counting what it skips."""

    errors: str = "strict"
    skip_invalid: bool = False
    empty: int = 0
    invalid: int = 0
    skipped_bytes: int = 0  # bytes of skipped input not yet reported to the progress bar
    warnings: list[str] = field(default_factory=list)

    def _invalid(self, message: str, nbytes: int = 0) -> None:
        if not self.skip_invalid:
            raise ToolboxError(message)
        self.invalid += 1
        self.skipped_bytes += nbytes
        click.echo(f"skipped: {message}", err=True)

    def _empty(self, nbytes: int = 0) -> None:
        self.empty += 1
        self.skipped_bytes += nbytes

    def arguments(self, texts: tuple[str, ...]) -> Iterator[Text]:
        for i, text in enumerate(texts, 1):
            if text:
                yield Text("argument", i if len(texts) > 1 else None, text, len(text.encode("utf-8")))
            else:
                self._empty()

    def lines(self, stream, source: str = "stdin") -> Iterator[Text]:
        for lineno, raw in enumerate(stream, 1):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            body = body[:-1] if body.endswith(b"\r") else body
            try:
                text = decode_line(body, lineno, self.errors, source)
            except ToolboxError as exc:
                self._invalid(str(exc), len(raw))
                continue
            if not text:
                self._empty(len(raw))
                continue
            yield Text(source, lineno, text, len(raw))

    def document(self, stream, source: str) -> Iterator[Text]:
        try:
            text = read_whole(stream, self.errors, source)
        except ToolboxError as exc:
            self._invalid(str(exc))
            return
        if not text:
            self._empty()
            return
        yield Text(source, None, text, len(text.encode("utf-8")), whole=True)

    def files(self, paths: list[str]) -> Iterator[Text]:
        for path in paths:
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise ToolboxError(f"{path}: cannot read ({exc.strerror})") from None
            with f:
                yield from self.document(f, path)

    def jsonl(self, stream, source: str, name: str) -> Iterator[Text]:
        for lineno, raw in enumerate(stream, 1):
            try:
                line = decode_line(raw.rstrip(b"\r\n"), lineno, self.errors, source)
            except ToolboxError as exc:
                self._invalid(str(exc), len(raw))
                continue
            if not line.strip():
                self._empty(len(raw))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                self._invalid(f"{source} line {lineno}: not JSON ({exc.msg} at column {exc.colno})", len(raw))
                continue
            if not isinstance(record, dict) or name not in record:
                self._invalid(f"{source} line {lineno}: no {name!r} field", len(raw))
                continue
            text = record[name]
            if not isinstance(text, str):
                self._invalid(f"{source} line {lineno}: field {name!r} is not a string", len(raw))
                continue
            if not text:
                self._empty(len(raw))
                continue
            yield Text(source, lineno, text, len(raw))


def _stream_size(stream) -> int | None:
    """Bytes a regular file on stdin holds from here on (None for pipes and terminals)."""
    import stat

    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return max(info.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    except (OSError, AttributeError, ValueError):
        pass
    return None


def _is_file(arg: str) -> bool:
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):  # a long text is no file name (ENAMETOOLONG), nor one with NUL
        return False


def _looks_like_path(arg: str) -> bool:
    return not any(c.isspace() for c in arg) and ("/" in arg or os.sep in arg or Path(arg).suffix.isascii() and
                                                   Path(arg).suffix[1:].isalnum())


# -- scoring ------------------------------------------------------------------------


def _label(model) -> str:
    dtype = model.describe().get("dtype")
    return f"{model.name} [{model.backend}{' ' + dtype if dtype else ''}]"


def _compare_choice(value: str, choice: ModelChoice, tokenizer) -> ModelChoice:
    """--compare: a registered backend (optionally BACKEND:DTYPE) means the same model there; else a model.

    A second model must use the same tokenizer (checked before its weights are loaded); it is
    taken at its default revision (--revision belongs to --model).
    """
    from dataclasses import replace

    from toolbox.api import tokenizer as model_tokenizer
    from toolbox.backends import registered

    backends = registered()
    name, _, dtype = value.partition(":")
    if value in backends or (dtype and name in backends):
        return replace(choice, backend=name, dtype=dtype or None, options={},
                       device=choice.device if name == choice.backend else None)
    other = model_tokenizer(value)
    if other.sp.serialized_model_proto() != tokenizer.sp.serialized_model_proto():
        raise ToolboxError(f"--compare {value}: its tokenizer differs from the model's, so the scores would not "
                           "be comparable")
    return replace(choice, model=value, revision=None)


def _group(texts: Iterator[Text], budget: int) -> Iterator[list[Text]]:
    group, size = [], 0
    for t in texts:
        group.append(t)
        size += len(t.text)
        if size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group


# -- output -------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _style(logprob: float | None) -> str:
    if logprob is None:
        return "dim italic"
    s = -logprob
    for limit, style in SURPRISAL_STYLES:
        if s < limit:
            return style
    return SURPRISAL_STYLES[-1][1]


def _visible(text: str) -> str:
    return text.replace("\t", "⇥").replace("\r", "␍").replace("\n", "⏎")


class Reporter:
    """Writes per-text results and the corpus summary, as JSON lines or rich tables."""

    def __init__(self, tok, as_json: bool, per_token: bool, summary: bool, compare: bool):
        self.tok, self.as_json, self.per_token, self.summary, self.compare = tok, as_json, per_token, summary, compare
        self.rows: list[tuple] = []
        self.out = stdout_bytes()
        self.console = None
        if not as_json:
            from rich.console import Console

            self.console = Console(highlight=False)

    def text(self, index: int, t: Text, ids: list[int], offset: int, lps, ranks, st, cmp_st=None, diff=None,
             cmp_lps=None) -> None:
        """`offset`: how many leading tokens of `ids` are unscored (1 without a prefix, 0 with one)."""
        if self.as_json:
            if self.summary:
                return
            rec = {"index": index, "source": t.source, "line": t.line}
            if not t.whole:
                rec["text"] = t.text
            rec["tokens"] = len(ids)
            rec.update({k: v for k, v in st.as_dict().items() if k in ("scored", "logprob", "mean_nll", "ppl")})
            if cmp_st is not None:
                rec["compare"] = {"logprob": cmp_st.logprob, "mean_nll": cmp_st.mean_nll, "ppl": cmp_st.ppl,
                                  "mean_abs_logprob_diff": diff}
            if self.per_token:
                rec["per_token"] = self._token_records(ids, offset, lps, ranks, cmp_lps)
            self.out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            self.out.flush()
            return
        if self.per_token:
            self._render_tokens(index, t, ids, offset, lps, ranks, st, cmp_lps)
        elif not self.summary:
            row = [str(index + 1), t.where, str(len(ids)), str(st.scored), _num(st.logprob, ".4f"),
                   _num(st.mean_nll, ".4f"), _num(st.ppl, ".4f")]
            if cmp_st is not None:
                row += [_num(cmp_st.ppl, ".4f"), _num(diff, ".5f")]
            self.rows.append(row)

    def _token_records(self, ids, offset, lps, ranks, cmp_lps) -> list[dict]:
        recs = []
        for k, tid in enumerate(ids):
            j = k - offset
            scored = j >= 0
            rec = {"id": tid, "piece": self.tok.id_to_piece(tid),
                   "logprob": round(lps[j], 6) if scored else None, "rank": ranks[j] if scored else None}
            if cmp_lps is not None:
                rec["compare_logprob"] = round(cmp_lps[j], 6) if scored else None
            recs.append(rec)
        return recs

    def _display(self, tid: int) -> str:
        raw = self.tok.token_bytes[tid]
        try:
            return raw.decode("utf-8") if raw else self.tok.id_to_piece(tid)
        except UnicodeDecodeError:
            return self.tok.id_to_piece(tid)

    def _render_tokens(self, index, t, ids, offset, lps, ranks, st, cmp_lps) -> None:
        from rich.rule import Rule
        from rich.table import Table
        from rich.text import Text as RichText

        c = self.console
        c.print(Rule(f"#{index + 1} {t.where}: {len(ids)} tokens, {st.scored} scored, PPL {_num(st.ppl, '.4f')}",
                     align="left"))
        # The text, each token coloured by its surprisal; byte-fallback pieces are joined
        # back into their character, which takes the highest surprisal among them.
        line = RichText()
        pending, worst = b"", None
        for k, tid in enumerate(ids):
            lp = lps[k - offset] if k >= offset else None
            pending += self.tok.token_bytes[tid]
            if lp is not None:
                worst = lp if worst is None else min(worst, lp)
            try:
                chunk = pending.decode("utf-8")
            except UnicodeDecodeError:
                if len(pending) < 4:
                    continue
                chunk = pending.decode("utf-8", "replace")
            line.append(chunk.replace("\n", "⏎\n"), style=_style(worst))
            pending, worst = b"", None
        if pending:
            line.append(pending.decode("utf-8", "replace"), style=_style(worst))
        c.print(line)
        table = Table("#", "piece", "text", "logprob", "rank", "surprisal", *(["logprob B"] if cmp_lps is not None else []),
                      box=None, pad_edge=False)
        for k, tid in enumerate(ids):
            j = k - offset
            lp = lps[j] if j >= 0 else None
            cells = [str(k), self.tok.id_to_piece(tid), _visible(self._display(tid)),
                     _num(lp, ".4f"), str(ranks[j]) if j >= 0 else "-", _num(None if lp is None else -lp, ".2f")]
            if cmp_lps is not None:
                cells.append(_num(cmp_lps[j] if j >= 0 else None, ".4f"))
            table.add_row(*[RichText(x) for x in cells], style=_style(lp))
        c.print(table)

    def finish(self, sides: list, corpora, diff, counts: dict, settings: dict) -> None:
        """`sides`: the model(s) scored with (the second is --compare's)."""
        if self.as_json:
            corpus = {"texts": counts["texts"], "tokens": counts["tokens"], **corpora[0].as_dict(),
                      "empty_skipped": counts["empty"], "invalid_skipped": counts["invalid"],
                      "model": sides[0].name, "backend": sides[0].backend, **settings}
            if len(sides) > 1:
                corpus["compare"] = {**corpora[1].as_dict(), "model": sides[1].name,
                                     "backend": sides[1].backend,
                                     "mean_abs_logprob_diff": diff.mean, "max_abs_logprob_diff": diff.largest}
            self.out.write((json.dumps({"corpus": corpus}, ensure_ascii=False) + "\n").encode("utf-8"))
            self.out.flush()
            return
        from rich.table import Table
        from rich.text import Text as RichText

        c = self.console
        if self.rows:
            cols = ["#", "source", "tokens", "scored", "log-likelihood", "mean NLL", "PPL"]
            if len(sides) > 1:
                cols += ["PPL B", "mean |Δlogprob|"]
            table = Table(*cols)
            for col in table.columns[2:]:
                col.justify = "right"
            for row in self.rows:
                table.add_row(*[RichText(x) for x in row])
            c.print(table)
        skipped = f", {_n(counts['empty'], 'empty line')} skipped"
        if counts["invalid"]:
            skipped += f", {_n(counts['invalid'], 'invalid input')} skipped"
        window = f"window {settings['window']}, stride {settings['stride']}, prefix {settings['prefix']}"
        for k, (side, st) in enumerate(zip(sides, corpora)):
            tag = ("A " if k == 0 else "B ") if len(sides) > 1 else ""
            c.print(RichText(f"{tag}{_label(side)}: {_ppl_line(st)} ({_n(st.scored, 'token')}, "
                             f"{_n(counts['texts'], 'text')}{skipped}; {window})"))
        if len(sides) > 1:
            c.print(RichText(f"mean |Δlogprob| = {_num(diff.mean, '.6f')} nats over {_n(diff.n, 'token')} "
                             f"(max {diff.largest:.6f}); ΔPPL = {_num(_sub(corpora[1].ppl, corpora[0].ppl), '+.4f')}"))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _sub(a, b):
    return None if a is None or b is None else a - b


def _ppl_line(st) -> str:
    if st.ppl is None:
        return "PPL = - (no tokens scored)"
    if st.ppl_stderr is None:
        return f"PPL = {st.ppl:.4f}"
    return f"PPL = {st.ppl:.4f} +/- {st.ppl_stderr:.5f}"


# -- the command --------------------------------------------------------------------


@click.command()
@click.argument("args", nargs=-1)
@click.option("-t", "--text", "as_text", is_flag=True, help="Treat every argument as a text, even one that names a file.")
@click.option("--whole", is_flag=True, help="Treat all of stdin as one document (default: each line is a text).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="A JSONL file of records (- for stdin); the text is in --field.")
@click.option("--field", default="text", show_default=True, help="With --input: the text's field in each record.")
@click.option("--window", type=click.IntRange(min=2), default=None,
              help="Tokens per model call [default: the model's context].")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="New tokens scored per window after the first [default: window // 2].")
@click.option("--prefix", type=click.Choice(["none", "bos", "eos"]), default="none", show_default=True,
              help="Token put before each document as context for its first token (never scored).")
@click.option("--compare", "compare", metavar="BACKEND[:DTYPE]|MODEL", default=None,
              help="Also score with a second backend (same model) or a second model (same backend).")
@click.option("--per-token", is_flag=True, help="Every token with its piece, log-probability and rank.")
@click.option("--summary", is_flag=True, help="Only the corpus summary (no per-text rows).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines: one object per text, then {\"corpus\": ...}.")
@click.option("--skip-invalid", is_flag=True, help="Skip (and count) invalid UTF-8 or JSONL lines instead of stopping.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr for files and stdin [default: when stderr is a terminal].")
@nl_option
@errors_option
@model_load_options
def score(args, as_text, whole, input_path, field, window, stride, prefix, compare, per_token, summary, as_json,
          skip_invalid, progress, nl, errors, choice):
    """Log-likelihood and perplexity of texts, per text and over the corpus.

    ARGS are texts, or files (each file is one document) when they all name files.
    Without ARGS, each line of stdin is a text (empty lines are skipped and counted),
    or all of stdin is one document with --whole; --input reads JSONL records.

    Each text reports its tokens, total log-likelihood (nats), mean negative
    log-likelihood and perplexity; the last line is the token-weighted corpus
    perplexity with its standard error, `PPL = X +/- Y`, as llama.cpp reports it.
    A text's first token has no left context and is not scored unless --prefix gives
    it one. Texts longer than --window are scored in a sliding window: every token
    exactly once, with at least window - stride tokens of left context (see
    docs/score.md).

    \b
    Examples:
      toolbox score "吾輩は猫である。名前はまだ無い。"
      toolbox score -t 候補A 候補B 候補C --json
      toolbox score novel.txt --stride 256
      toolbox score --input data.jsonl --field text --json
      toolbox score --whole < novel.txt --compare quant
    """
    sources = [bool(args), whole, input_path is not None]
    if sum(sources) > 1:
        raise click.UsageError("give texts or files, --whole, or --input: one kind of input")
    files: list[str] = []
    texts: tuple[str, ...] = ()
    if args:
        are_files = [_is_file(a) for a in args]
        if as_text or not any(are_files):
            texts = args
            if not as_text and len(args) == 1 and _looks_like_path(args[0]):
                click.echo(f"note: {args[0]!r} is not a file; scoring it as text (-t silences this)", err=True)
        elif all(are_files):
            files = list(args)
        else:
            missing = args[are_files.index(False)]
            raise click.UsageError(f"{missing!r} is not a file, while other arguments are (use -t to score texts)")

    from toolbox.scoring import Accumulator, DiffAccumulator

    choice.check()
    if input_path not in (None, "-") and not Path(input_path).is_file():
        raise ToolboxError(f"--input {input_path}: no such file")
    # files, stdin and --input are long runs of scoring (texts in ARGS are not): see `toolbox.load`
    workload = "short" if texts else "score"
    model = choice.load(workload)
    sides = [model]
    if compare:
        sides.append(_compare_choice(compare, choice, model.tokenizer).load(workload))
    tok = model.tokenizer
    prefix = None if prefix == "none" else prefix
    try:
        window, stride, _ = model.scoring_plan(window, stride, prefix, min(m.context_length for m in sides))
    except ToolboxError as exc:
        setting, _, reason = str(exc).partition(": ")
        raise click.BadParameter(reason, param_hint=f"--{setting}") from None
    offset = 0 if prefix is not None else 1

    inputs = Inputs(errors, skip_invalid)
    total_bytes = None
    if texts:
        stream = inputs.arguments(texts)
    elif files:
        stream = inputs.files(files)
        total_bytes = sum(os.path.getsize(f) for f in files)
    elif input_path is not None:
        if input_path == "-":
            raw, name = stdin_bytes(), "stdin"
        else:
            try:
                raw, name = open(input_path, "rb"), input_path
            except OSError as exc:
                raise ToolboxError(f"{input_path}: cannot read ({exc.strerror})") from None
        total_bytes = _stream_size(raw)
        stream = inputs.jsonl(raw, name, field)
    elif whole:
        total_bytes = _stream_size(stdin_bytes())
        stream = inputs.document(stdin_bytes(), "stdin")
    else:
        total_bytes = _stream_size(stdin_bytes())
        stream = inputs.lines(stdin_bytes())

    reporter = Reporter(tok, as_json, per_token, summary, compare is not None)
    corpora = [Accumulator() for _ in sides]
    diff = DiffAccumulator()
    counts = {"texts": 0, "tokens": 0}
    bar = _progress(progress, bool(texts), total_bytes)
    index = 0
    try:
        with bar:
            task = bar.add_task("scoring", total=total_bytes, tokens=0) if bar.enabled else None
            for group in _group(stream, GROUP_CHARS):
                done = [0.0] * len(group)

                def advance(doc: int, share: float, _group=group, _done=done) -> None:
                    if task is not None:
                        step = _group[doc].nbytes * share / len(sides)
                        _done[doc] += step
                        bar.advance(task, step)

                batch = [t.text for t in group]
                settings = dict(window=window, stride=stride, prefix=prefix, nl=nl)
                if len(sides) > 1:
                    cmp = model.compare(sides[1], batch, progress=advance, **settings)
                    results = [cmp.a, cmp.b]
                else:
                    results = [model.score(batch, progress=advance, **settings)]
                for k, t in enumerate(group):
                    first = results[0].texts[k]
                    for acc, res in zip(corpora, results):
                        acc.add(res.texts[k].logprobs)
                    cmp_st = cmp_lps = text_diff = None
                    if len(sides) > 1:
                        second = results[1].texts[k]
                        cmp_lps, cmp_st, text_diff = second.logprobs, second.stats, cmp.text_diffs[k]
                        diff.add(first.logprobs, cmp_lps)
                    reporter.text(index, t, first.token_ids, offset, first.logprobs, first.ranks, first.stats,
                                  cmp_st, text_diff, cmp_lps)
                    index += 1
                    counts["texts"] += 1
                    counts["tokens"] += len(first.token_ids)
                    if task is not None:
                        bar.advance(task, t.nbytes - done[k] + inputs.skipped_bytes)
                        inputs.skipped_bytes = 0
                        bar.update(task, tokens=counts["tokens"])
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    counts.update(empty=inputs.empty, invalid=inputs.invalid)
    settings = {"window": window, "stride": stride, "prefix": prefix or "none"}
    reporter.finish(sides, [acc.stats() for acc in corpora], diff, counts, settings)


class _NoProgress:
    enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(wanted: bool | None, from_arguments: bool, total: int | None):
    """A rich progress bar on stderr for files and stdin (off for arguments, pipes to non-terminals)."""
    from rich.console import Console

    console = Console(stderr=True)
    if wanted is False or (wanted is None and (from_arguments or not console.is_terminal)):
        return _NoProgress()
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[tokens]} tokens"), TimeElapsedColumn()]
    bar = Progress(*columns, console=console, transient=True)
    bar.enabled = True
    return bar
