"""Batch conversion of a model zoo: one process per model, a per-model timeout, shards, summaries.

    inputs (files, folders, globs, @lists) -> sorted jobs -> this shard's jobs (index mod N)
    -> up to N worker processes, each running compress_file on one model -> one row per model
    -> summary JSON/CSV; merge_summaries joins the shards' JSON files

A worker that fails, times out or crashes costs only its own model: the batch goes on, the row says
what happened, and nothing of that model's output is left behind. Nothing here prints; the caller
gets each row through ``on_result`` as it arrives.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from . import __version__
from .config import CompressConfig
from .errors import InvalidConfigError, UdfcError, ValidationError, first_line

__all__ = ["BatchJob", "BatchRow", "collect_inputs", "parse_shard", "select_shard", "run_batch", "make_summary",
           "summary_csv", "merge_summaries", "STATUSES"]

#: Row statuses: converted; refused (bad or unsupported input/options); output failed its check;
#: ran past --timeout; the worker died (a crash in a native library); an unexpected exception (a bug).
STATUSES = ("ok", "failed", "check-failed", "timeout", "crashed", "error")
CSV_FIELDS = ("name", "status", "message", "seconds", "params_before", "params_after", "macs_before", "macs_after",
              "bytes_before", "bytes_after", "fused_convs", "max_abs", "cosine", "input", "output")


@dataclass(frozen=True)
class BatchJob:
    """One model to convert.

    Attributes
    ----------
    name : str
        Output path relative to the output folder (``/``-separated); the sort and shard key, the
        same on every machine whatever the mount point.
    input : str
    output : str
    """

    name: str
    input: str
    output: str


@dataclass
class BatchRow:
    """What happened to one model (a row of the summary)."""

    name: str
    input: str
    output: str
    status: str
    message: str = ""
    seconds: float = 0.0
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    fused_convs: int | None = None
    max_abs: float | None = None
    cosine: float | None = None
    report: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _list_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"@{path}: cannot read the list file ({first_line(exc)})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def collect_inputs(specs: Sequence[str], out_dir: str | os.PathLike) -> list[BatchJob]:
    """Expand inputs into sorted jobs.

    Parameters
    ----------
    specs : sequence of str
        Each one a model file (kept even if missing: its row will say so), a folder (every ``*.onnx``
        below it, the relative path kept in the output), a glob (``'zoo/**/*.onnx'``, expanded here
        when the shell did not), or ``@list.txt`` (one such entry per line, ``#`` comments).
    out_dir : path
        The output folder; models found inside it are ignored (a rerun must not eat its own outputs).

    Raises
    ------
    InvalidConfigError
        A folder or glob with no model, nothing at all to do, or two inputs that would write the same output.
    """
    out_root = Path(out_dir).resolve()
    expanded: list[str] = []
    for spec in specs:
        expanded += _list_file(spec[1:]) if spec.startswith("@") else [spec]
    found: list[tuple[str, Path]] = []  # (output name, input path)
    for spec in expanded:
        path = Path(spec)
        if path.is_dir():
            models = sorted(p for p in path.rglob("*.onnx") if p.is_file() and out_root not in p.resolve().parents)
            if not models:
                raise InvalidConfigError(f"{spec}: folder has no .onnx file")
            found += [(p.relative_to(path).as_posix(), p) for p in models]
        elif glob.has_magic(spec) and not path.exists():
            models = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            models = [p for p in models if out_root not in p.resolve().parents]
            if not models:
                raise InvalidConfigError(f"{spec}: pattern matches no file")
            found += [(p.name, p) for p in models]
        else:
            found.append((path.name, path))
    if not found:
        raise InvalidConfigError("no input models given")
    by_name: dict[str, Path] = {}
    for name, path in found:
        if name in by_name and by_name[name].resolve() != path.resolve():
            raise InvalidConfigError(f"{by_name[name]} and {path} would both write {Path(out_dir) / name}; "
                                     "give their folder instead, so the relative paths keep them apart")
        by_name[name] = path
    return [BatchJob(name, str(by_name[name]), str(Path(out_dir) / name)) for name in sorted(by_name)]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``K/N`` -> (K, N), 0 <= K < N (0-based, like a Kubernetes JOB_COMPLETION_INDEX)."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = -1
    if not sep or count < 1 or not 0 <= index < count:
        raise InvalidConfigError(f"--shard must be K/N with 0 <= K < N (0-based), got {text!r}")
    return index, count


def select_shard(jobs: Sequence[BatchJob], shard: tuple[int, int] | None) -> list[BatchJob]:
    """The jobs of shard K of N: job i of the sorted list goes to shard i mod N.

    Every shard must be given the same inputs; the assignment then depends on nothing else
    (not the machine, the mount point or the time), and the shards together cover every job once.
    """
    if shard is None:
        return list(jobs)
    index, count = shard
    return [job for i, job in enumerate(jobs) if i % count == index]


# ----------------------------------------------------------------------------------------------
# Workers

def _row_from_report(job: BatchJob, report, seconds: float) -> BatchRow:
    v = report.validation or {}
    return BatchRow(job.name, job.input, job.output, "ok", "", seconds, report.before.params, report.after.params,
                    report.before.macs, report.after.macs, report.before.file_bytes, report.after.file_bytes,
                    report.after.fused_convs, v.get("max_abs"), v.get("cosine"), report.to_dict())


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _work(job: BatchJob, config: CompressConfig, options, conn) -> None:
    """Worker process body: convert one model, send back one row (as a dict)."""
    # SIGTERM (the parent's timeout) becomes an exception, so compress_file removes its staging folder.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    from .pipeline import compress_file

    start = time.perf_counter()
    try:
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        row = _row_from_report(job, compress_file(job.input, job.output, config, options=options), 0.0)
    except ValidationError as exc:
        row = BatchRow(job.name, job.input, job.output, "check-failed", first_line(exc))
    except UdfcError as exc:
        row = BatchRow(job.name, job.input, job.output, "failed", first_line(exc))
    except MemoryError:
        row = BatchRow(job.name, job.input, job.output, "failed", "out of memory")
    except Exception as exc:  # a bug: keep the traceback in the summary
        row = BatchRow(job.name, job.input, job.output, "error", f"internal error: {type(exc).__name__}: {first_line(exc)}",
                       report={"traceback": traceback.format_exc()})
    prefix = f"{job.input}: "
    if row.message.startswith(prefix):  # the row already names the model
        row.message = row.message[len(prefix):]
    row.seconds = time.perf_counter() - start
    conn.send(row.to_dict())
    conn.close()


def _context():
    """Worker start method: forkserver (children forked from a clean, pre-imported server), else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["udfc_onnx.pipeline"])
        return ctx
    return mp.get_context("spawn")


def _remove_partial(job: BatchJob) -> None:
    """Remove what a killed worker may have left: its staging folders beside the output."""
    from .pipeline import staging_glob

    out = Path(job.output)
    for leftover in out.parent.glob(staging_glob(out)):
        shutil.rmtree(leftover, ignore_errors=True)


def _stop(proc, grace: float = 5.0) -> None:
    """SIGTERM (the worker cleans up), then SIGKILL if it is still there after ``grace`` seconds."""
    proc.terminate()
    proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join()


def run_batch(jobs: Sequence[BatchJob], config: CompressConfig, options, *, n_jobs: int = 1,
              timeout: float | None = None, on_result: Callable[[BatchRow], None] | None = None) -> list[BatchRow]:
    """Convert every job in its own worker process, at most ``n_jobs`` at a time.

    Parameters
    ----------
    jobs : sequence of BatchJob
    config : CompressConfig
    options : FileOptions
    n_jobs : int, default=1
        Worker processes at a time (each holds one model in memory).
    timeout : float, optional
        Seconds per model; a worker past it is terminated (then killed) and its row says ``timeout``.
    on_result : callable, optional
        Called with each row as soon as its model is done (in completion order).

    Returns
    -------
    list of BatchRow
        In the order of ``jobs``.
    """
    if n_jobs < 1:
        raise InvalidConfigError(f"--jobs must be >= 1, got {n_jobs}")
    if timeout is not None and not timeout > 0:
        raise InvalidConfigError(f"--timeout must be > 0 seconds, got {timeout}")
    ctx = _context()
    pending = list(enumerate(jobs))[::-1]
    running: dict = {}  # sentinel -> (index, job, process, connection, start)
    rows: dict[int, BatchRow] = {}

    def finish(sentinel, row: BatchRow) -> None:
        index, job, proc, conn, _ = running.pop(sentinel)
        conn.close()
        proc.join()
        if row.status != "ok":
            _remove_partial(job)
        rows[index] = row
        if on_result:
            on_result(row)

    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                index, job = pending.pop()
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_work, args=(job, config, options, send), name=f"udfc:{job.name}", daemon=True)
                proc.start()
                send.close()
                running[proc.sentinel] = (index, job, proc, receive, time.perf_counter())
            wait(list(running) + [entry[3] for entry in running.values()], timeout=0.2)
            now = time.perf_counter()
            for sentinel, (index, job, proc, conn, start) in list(running.items()):
                if conn.poll():
                    try:
                        row = BatchRow(**conn.recv())
                    except (EOFError, OSError):
                        row = None
                    if row is not None:
                        finish(sentinel, row)
                        continue
                if not proc.is_alive() and not conn.poll():
                    code = proc.exitcode
                    why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    finish(sentinel, BatchRow(job.name, job.input, job.output, "crashed",
                                              f"worker died ({why}) without a result", now - start))
                elif timeout is not None and now - start > timeout:
                    _stop(proc)
                    finish(sentinel, BatchRow(job.name, job.input, job.output, "timeout",
                                              f"stopped after {timeout:g} s (--timeout)", now - start))
    finally:  # interrupted: stop every worker and clean up after it
        for sentinel, (index, job, proc, conn, start) in list(running.items()):
            _stop(proc)
            _remove_partial(job)
    return [rows[i] for i in sorted(rows)]


# ----------------------------------------------------------------------------------------------
# Summaries

def make_summary(rows: Sequence[BatchRow], *, shard: tuple[int, int] | None, total_inputs: int, config: dict,
                 options: dict, elapsed_s: float) -> dict:
    """The summary JSON of one batch run (one shard)."""
    return {"tool": "udfc-onnx", "version": __version__,
            "shard": {"index": shard[0], "count": shard[1]} if shard else None,
            "total_inputs": total_inputs, "config": config, "options": options, "elapsed_s": elapsed_s,
            "models": [r.to_dict() for r in rows]}


def summary_csv(models: Sequence[dict]) -> str:
    """One CSV row per model (the summary's columns, no per-unit detail)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for m in models:
        writer.writerow({k: "" if m.get(k) is None else m.get(k) for k in CSV_FIELDS})
    return buf.getvalue()


def merge_summaries(paths: Sequence[str | os.PathLike]) -> tuple[dict, list[str]]:
    """Join the summary JSON files of a sharded batch.

    Returns
    -------
    merged : dict
        A summary of the same form, ``shard`` None, ``models`` sorted by name, ``merged_from`` listing the files.
    problems : list of str
        Missing or repeated shards, shards of different splits or input lists, a model in two files.

    Raises
    ------
    InvalidConfigError
        A file that cannot be read or is not a udfc-onnx batch summary.
    """
    summaries = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidConfigError(f"{path}: cannot read a summary ({first_line(exc)})") from None
        if not isinstance(data, dict) or data.get("tool") != "udfc-onnx" or not isinstance(data.get("models"), list):
            raise InvalidConfigError(f"{path}: not a udfc-onnx batch summary")
        summaries.append((str(path), data))
    if not summaries:
        raise InvalidConfigError("no summary files given")
    problems: list[str] = []
    counts = {s["shard"]["count"] for _, s in summaries if s.get("shard")}
    totals = {s.get("total_inputs") for _, s in summaries}
    if len(counts) > 1:
        problems.append(f"shards of different splits: N = {sorted(counts)}")
    if len(totals) > 1:
        problems.append(f"shards saw different input lists: {sorted(t for t in totals if t is not None)} models")
    if len(counts) == 1:
        count = counts.pop()
        seen = [s["shard"]["index"] for _, s in summaries if s.get("shard")]
        missing = sorted(set(range(count)) - set(seen))
        repeated = sorted({i for i in seen if seen.count(i) > 1})
        if missing:
            problems.append(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)}")
        if repeated:
            problems.append(f"shard(s) given twice: {', '.join(f'{i}/{count}' for i in repeated)}")
    models: dict[str, dict] = {}
    for path, s in summaries:
        for m in s["models"]:
            if m.get("name") in models:
                problems.append(f"{m.get('name')} appears in more than one summary (last: {path})")
            models[m.get("name")] = m
    merged = {**summaries[0][1], "shard": None, "models": [models[k] for k in sorted(models)],
              "elapsed_s": sum(s.get("elapsed_s") or 0 for _, s in summaries), "merged_from": [p for p, _ in summaries]}
    if not problems and len(totals) == 1 and None not in totals and len(models) != next(iter(totals)):
        problems.append(f"{len(models)} models in the summaries, {next(iter(totals))} inputs expected")
    return merged, problems
