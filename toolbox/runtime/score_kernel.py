"""Each scored token's log-probability and rank from its row of logits, in one library
compiled ahead of time (AOTInductor) and kept on disk.

Scoring asks two numbers of each row of logits: the target's log-softmax and its rank
(1 + how many logits are larger). Eagerly that is a log-softmax, a comparison and a sum:
passes over the whole ``[N, V]`` block that write a new one each (the log-softmax, the
comparison's bools and the sum's widened copy of them). Inductor fuses them into one loop
per row that keeps the row in the core's cache and writes two numbers: 2.6 against 6.6 ms
for 524 rows of 8,000 logits at one thread (an Intel Xeon), a tenth of scoring the
embedded model (docs/performance.md). The same formula as the eager path, so the same
answers up to the rounding of ``exp`` (2e-6), ranks exactly, NaN and infinities included.

Nothing in it depends on a model (every size is dynamic), so one library per torch, thread
count and CPU (`toolbox.runtime.aot.compiled_path`) serves every checkpoint: built in about
ten seconds where a long run of scoring follows, loaded in milliseconds by later processes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from .generation import TokenScores

#: bump when what is compiled changes
FORMAT = 1


def library_path() -> Path:
    from .aot import compiled_path

    return compiled_path({"format": FORMAT, "computes": "token scores"}, "token-scores.so")


def build(target: Path) -> None:
    """Export `TokenScores` over any number of rows and any vocabulary and compile it into
    ``target`` (atomically: a process that builds it at the same time leaves one as good)."""
    from torch.export import Dim

    from .aot import compile_library, scratch_beside, use_inductor_cache_dir

    use_inductor_cache_dir()
    rows, vocab = Dim("rows", min=1, max=1 << 24), Dim("vocab", min=2, max=1 << 24)
    example = (torch.randn(37, 1000), torch.randint(0, 1000, (37,)))  # sizes no other size equals
    with scratch_beside(target) as work, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, inside export
        program = torch.export.export(TokenScores(), example, strict=False,
                                      dynamic_shapes={"logits": {0: rows, 1: vocab}, "targets": {0: rows}})
        compile_library(program, {}, work / "scores.so").replace(target)


def load(build_missing: bool) -> ScoreKernel | None:
    """The library of this machine: loaded when on disk, else built first (seconds) when
    ``build_missing``, else None."""
    path, built = library_path(), False
    if not path.is_file():
        if not build_missing:
            return None
        build(path)
        built = True
    try:
        return ScoreKernel(path, built)
    except RuntimeError:  # a damaged file (a disk error, a copy cut short): built again
        if built or not build_missing:
            raise
        build(path)
        return ScoreKernel(path, True)


class ScoreKernel:
    """The library, called like `TokenScores` (float32 logits on the CPU)."""

    def __init__(self, path: Path, built: bool):
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        #: whether this process compiled it (for the one-line note)
        self.built = built

    def __call__(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        # what the export assumed and nothing checks in C++: another layout would read wrong memory
        if logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous() or logits.is_cuda:
            raise ValueError("the token-score library takes contiguous float32 logits [N, V] on the CPU")
        if targets.shape != logits.shape[:1] or targets.dtype != torch.int64 or not len(targets):
            raise ValueError("the token-score library takes int64 targets [N >= 1], one per row of logits")
        low, high = torch.aminmax(targets)
        if low < 0 or high >= logits.shape[1]:  # the library's own check would end the process
            raise ValueError(f"target id outside the {logits.shape[1]} logits of a row")
        logprobs, ranks = self._runner.run([logits, targets.contiguous()])
        return logprobs, ranks
