"""Running one cell's source inside an engine, and returning its outcome (never raising)."""

from __future__ import annotations

import ast
import contextlib
import linecache
import sys
import time
import traceback

from nbdist._wire import CellOutcome, portable
from nbdist.backends import BACKENDS
from nbdist.engine import _metrics, _names
from nbdist.engine._context import _CONTEXT, place_threads, user_namespace
from nbdist.engine._debug import close_channels
from nbdist.engine._load import LoadSampler


def _split_last_expression(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        assert isinstance(last, ast.Expr)
        return tree, ast.Expression(last.value)
    return tree, None


def _format_failure(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's own frames on, without nbdist's frames above them. A
    syntax error in the cell has no frame of the cell: it is shown alone, with its line."""
    te = traceback.TracebackException.from_exception(exc)
    frames = list(te.stack)
    for i, frame in enumerate(frames):
        if frame.filename == filename:
            te.stack = traceback.StackSummary.from_list(frames[i:])
            return "".join(te.format())
    if isinstance(exc, SyntaxError):
        return "".join(te.format_exception_only())
    return "".join(te.format())


def run_cell(
    source: str, cell_id: str, backend: str, strategy: str, want_value: bool, line_offset: int = 0,
    subset: tuple[int, ...] | None = None,
) -> CellOutcome:
    """Execute a cell's source in the engine's user namespace.

    `line_offset` blank lines are put first so traceback line numbers match the lines the
    user sees in the notebook cell (whose first line is `%%distributed`)."""
    from IPython import get_ipython

    started = time.perf_counter()
    info = _CONTEXT.info
    rank = info.rank if info is not None else -1
    chosen = BACKENDS[backend].strategy(strategy)
    _CONTEXT.strategy = chosen
    place_threads(chosen.threads)
    if info is not None and _CONTEXT.backend is not None and not _CONTEXT.backend.runs_cell(info):
        return CellOutcome(rank=rank, ok=True)  # e.g. a parameter server: its gRPC server does the work
    shell = get_ipython()
    ns = user_namespace()
    filename = f"<distributed cell {cell_id}>"
    code = "\n" * line_offset + shell.transform_cell(source)
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    from ipyparallel.datapub import publish_data

    reporter = _metrics.Reporter(publish_data)
    group = _CONTEXT.backend
    extra = (lambda: group.memory(ns)) if group is not None else None
    sampler = LoadSampler(reporter.report, info.gpu if info is not None else None, extra=extra)
    _metrics.activate(reporter, between_steps=sampler.between_steps)
    sampler.start()
    guard = group.only_ranks(subset) if group is not None and subset is not None else contextlib.nullcontext()
    try:
        with guard:
            body, last = _split_last_expression(ast.parse(code, filename))
            exec(compile(body, filename, "exec"), ns)
            value = eval(compile(last, filename, "eval"), ns) if last is not None else None
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, KeyboardInterrupt too
        _CONTEXT.last_failure = exc
        _end_metrics(sampler, reporter)
        close_channels()
        return CellOutcome(
            rank=rank,
            ok=False,
            ename=type(exc).__name__,
            evalue=_with_hint(exc),
            traceback=_format_failure(exc, filename),
            interrupted=isinstance(exc, KeyboardInterrupt),
            seconds=time.perf_counter() - started,
        )
    _end_metrics(sampler, reporter)
    _show_figures()
    close_channels()
    display = None
    if want_value and value is not None:
        value, display = portable(value, shell)
    else:
        value = None
    return CellOutcome(rank=rank, ok=True, value=value, display=display, seconds=time.perf_counter() - started,
                       names=_names.changes(ns) if want_value else None)


HINTS = (
    (("SyncBatchNorm", "GPU"),
     "nn.SyncBatchNorm runs on GPUs only. On CPU ranks, nbdist.torch.sync_batchnorm(model) normalises over the "
     "global batch (in a cell, nn.SyncBatchNorm.convert_sync_batchnorm(model) gives the same)."),
)
"""(words all in the error, the fix): errors whose own message does not say what to do here."""


def _with_hint(exc: BaseException) -> str:
    text = str(exc)
    for words, fix in HINTS:
        if all(word in text for word in words):
            return f"{text} [{fix}]"
    return text


def _end_metrics(sampler: LoadSampler, reporter: _metrics.Reporter) -> None:
    sampler.stop()
    _metrics.activate(None)
    reporter.flush()


def _show_figures() -> None:
    """Figures the cell drew without `plt.show()` are shown at its end, as the inline backend
    does after a cell in a one-process notebook."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None or "inline" not in str(plt.get_backend()):
        return
    from IPython.display import display

    try:
        for number in plt.get_fignums():
            display(plt.figure(number))
    finally:
        plt.close("all")


