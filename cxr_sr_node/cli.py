"""``cxr-sr-node``: serve, worker, batch, check, status, retry, bench, and the ``model`` group.

Configuration is merged here, once: defaults < TOML (``--config`` or ``CXRSR_CONFIG``) <
``CXRSR_*`` environment < flags, into a frozen ``NodeConfig`` passed down to everything else.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from cxr_sr_node import __version__
from cxr_sr_node.config import ConfigError, NodeConfig, load_config
from cxr_sr_node.logs import configure_logging


def _config(config_file: Path | None, **flags: Any) -> NodeConfig:
    try:
        return load_config(toml_path=config_file, flags=flags)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _existing_spool(cfg: NodeConfig) -> Any:
    """The spool of ``status`` / ``retry``: one that exists (a mistyped path must not look like an
    empty, healthy spool, created on the spot), opened with a one-line error when it cannot be."""
    from cxr_sr_node.spool import Spool

    if not (Path(cfg.spool) / "jobs.sqlite").is_file():
        raise click.ClickException(
            f"no spool at {cfg.spool} (no jobs.sqlite there): check spool / --spool / CXRSR_SPOOL; "
            "a node creates its spool when it first starts"
        )
    try:
        return Spool(cfg.spool)
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(f"spool {cfg.spool} cannot be opened: {exc}") from None


config_option = click.option(
    "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (see deploy/cxr-sr-node.example.toml); env CXRSR_CONFIG.",
)
spool_option = click.option("--spool", type=click.Path(file_okay=False, path_type=Path), help="Spool folder [spool].")
device_option = click.option("--device", help="Where the model runs: auto, cpu, cuda or cuda:N [auto].")
checkpoint_option = click.option(
    "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Generator checkpoint (.safetensors with its .json card) [the shipped CPU model].",
)
broker_option = click.option("--broker-url", help="RabbitMQ URL for the celery runner [amqp://guest:guest@127.0.0.1:5672//].")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cxr-sr-node")
def main() -> None:
    """DICOM node that returns 4x super-resolved chest X-rays (CSAEGAN) as a derived series."""


@main.command()
@config_option
@click.option("--ae", "ae_title", help="Our AE title [CXRSR].")
@click.option("--port", type=int, help="DICOM port [11112].")
@click.option("--bind", "bind_address", help="Address to listen on [0.0.0.0].")
@click.option("--dest", help="Where derived series go: AE@HOST:PORT.")
@spool_option
@click.option("--allow", multiple=True, help="Calling AE allowed to store, AE or AE@HOST (repeatable).")
@device_option
@checkpoint_option
@click.option("--workers", type=int, help="Worker processes (one per GPU) [1].")
@click.option("--http-port", type=int, help="Port for /healthz and /metrics [off].")
@click.option("--series-idle-s", type=float, help="Seconds without a new instance before a series is complete [5].")
@click.option("--runner", type=click.Choice(["embedded", "celery"]),
              help="embedded: worker processes here; celery: `cxr-sr-node worker` processes via RabbitMQ [embedded].")
@broker_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config_file: Path | None, allow: tuple[str, ...], **flags: Any) -> None:
    """Run the DICOM node: receive, super-resolve, send back."""
    cfg = _config(config_file, allow=allow, **flags)
    configure_logging(cfg.log_level, json=cfg.log_json)
    from cxr_sr_node.node import Node

    try:
        Node(cfg).serve_forever()
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--queues", default="gpu,send", show_default=True,
              help="What this worker consumes: gpu (process jobs; loads the model), send (C-STORE to the "
                   "destination; no torch), or gpu,send.")
@config_option
@click.option("--spool", type=click.Path(file_okay=False, path_type=Path),
              help="The node's spool on shared storage (each message names its spool; this one is checked at start).")
@device_option
@checkpoint_option
@broker_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def worker(config_file: Path | None, queues: str, **flags: Any) -> None:
    """Run a Celery worker for a node started with `serve --runner celery`.

    One gpu worker per GPU (choose it with CUDA_VISIBLE_DEVICES), any number of send workers. The
    spool must be the node's, at the same path (shared storage); use the node's settings file."""
    names = tuple(dict.fromkeys(q.strip() for q in queues.split(",") if q.strip()))
    if not names or not set(names) <= {"gpu", "send"}:
        raise click.BadParameter(f"expected gpu, send or gpu,send, got {queues!r}", param_hint="--queues")
    cfg = _config(config_file, **flags)
    configure_logging(cfg.log_level, json=cfg.log_json)
    try:
        from cxr_sr_node.queue import run_worker
    except ImportError as exc:
        raise click.ClickException(f"the worker needs Celery ({exc}): pip install 'cxr-sr-node[queue]'") from None
    try:
        sys.exit(run_worker(cfg, names))
    except (RuntimeError, OSError, ValueError) as exc:  # broker, CUDA, a bad checkpoint: one line
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("in_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--recursive", "-r", is_flag=True, help="Descend into sub-folders.")
@config_option
@device_option
@checkpoint_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def batch(in_dir: Path, out_dir: Path, recursive: bool, config_file: Path | None, no_progress: bool, **flags: Any) -> None:
    """Derive every eligible DICOM file of IN_DIR into OUT_DIR/<study>/<series>/<sop>.dcm."""
    cfg = _config(config_file, **flags)
    configure_logging("warning" if cfg.log_level == "info" else cfg.log_level, json=cfg.log_json)
    from cxr_sr_node.batch import BatchError, print_summary, run_batch

    try:
        summary = run_batch(in_dir, out_dir, cfg, recursive=recursive, progress=not no_progress)
    except BatchError as exc:
        raise click.ClickException(str(exc)) from None
    print_summary(summary)
    sys.exit(130 if summary.interrupted else 1 if summary.failed else 0)


@main.command()
@config_option
@spool_option
@checkpoint_option
@device_option
@click.option("--dest", help="Destination to C-ECHO: AE@HOST:PORT.")
@click.option("--no-model", is_flag=True, help="Skip loading the model (fast liveness check).")
@click.option("--no-dest", is_flag=True,
              help="Skip the C-ECHO to the destination (a start-up check: the node receives, and retries "
                   "sending, while the PACS is down).")
def check(config_file: Path | None, no_model: bool, no_dest: bool, **flags: Any) -> None:
    """Health check: exits 0 when config, spool, model and destination are usable, else 1."""
    cfg = _config(config_file, **flags)
    from cxr_sr_node.health import run_checks

    ok = True
    for name, passed, detail in run_checks(cfg, load_model=not no_model, echo_dest=not no_dest):
        click.echo(f"{'ok  ' if passed else 'FAIL'} {name}: {detail}")
        ok &= passed
    sys.exit(0 if ok else 1)


@main.command()
@config_option
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_file: Path | None, as_json: bool, **flags: Any) -> None:
    """Spool counts by state, and the failed jobs with their reasons."""
    cfg = _config(config_file, **flags)
    spool = _existing_spool(cfg)
    counts = spool.counts()
    failed = [{"job_id": j.job_id, "series_instance_uid": j.series_uid, "reason": j.reason} for j in spool.jobs("failed")]
    holder = spool.node_holder()
    broker = None
    if cfg.runner == "celery":  # what waits in RabbitMQ besides what the spool says
        from cxr_sr_node.health import check_broker

        _, broker_ok, broker_detail = check_broker(cfg)
        broker = {"ok": broker_ok, "detail": broker_detail}
    if as_json:
        click.echo(json.dumps({"spool": str(cfg.spool), "node_pid": holder, "counts": counts, "failed": failed,
                               **({"broker": broker} if broker else {})}, indent=2))
        return
    click.echo(f"spool {cfg.spool} ({f'served by pid {holder}' if holder else 'no node running on it'})")
    if broker:
        click.echo(f"broker {'ok' if broker['ok'] else 'UNREACHABLE'}: {broker['detail']}")
    for key, value in counts.items():
        stale = holder is None and key in ("running", "sending") and value and cfg.runner == "embedded"
        click.echo(f"  {key:<16} {value}" + ("  (left by a node that stopped; taken again at its next start)"
                                            if stale else ""))
    for job in failed:
        click.echo(f"failed {job['job_id']}: {job['reason']}")


@main.command()
@click.argument("job_ids", nargs=-1)
@click.option("--all-failed", is_flag=True, help="Re-queue every failed job.")
@config_option
@spool_option
def retry(job_ids: tuple[str, ...], all_failed: bool, config_file: Path | None, **flags: Any) -> None:
    """Re-queue failed jobs (to sending if their output exists, else to processing)."""
    if not job_ids and not all_failed:
        raise click.UsageError("name at least one JOB_ID, or --all-failed")
    cfg = _config(config_file, **flags)
    spool = _existing_spool(cfg)
    ids = list(job_ids) + ([j.job_id for j in spool.jobs("failed")] if all_failed else [])
    if not ids:  # --all-failed with nothing failed: nothing to do is not an error (cron)
        click.echo("no failed jobs to re-queue")
        return
    publisher = None
    if cfg.runner == "celery":  # publish now rather than at the node's next reconcile pass (up to a minute)
        with contextlib.suppress(ImportError):  # without Celery the node publishes it at its reconcile pass
            from cxr_sr_node.queue import Publisher

            publisher = Publisher(cfg)
    errors = 0
    try:
        for job_id in ids:
            try:
                state = spool.retry(job_id)
            except (KeyError, ValueError) as exc:
                click.echo(f"{job_id}: {exc.args[0]}", err=True)
                errors += 1
                continue
            note = ""
            if publisher is not None:
                try:
                    publisher.publish("send" if state == "outgoing" else "process", job_id)
                    note = " (published to the queue)"
                except Exception as exc:  # noqa: BLE001 - the spool is the truth: the node publishes it later
                    note = f" (not published now: {type(exc).__name__}; the node publishes it within about a minute)"
            click.echo(f"{job_id}: re-queued as {state}{note}")
    finally:
        if publisher is not None:
            publisher.close()
    sys.exit(1 if errors else 0)


@main.group()
def bench() -> None:
    """Benchmarks that print figures and a ratio against a baseline run in the same process."""


@bench.command("receive")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True, help="Instances to send.")
@click.option("--size-mib", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
              help="Pixel data per instance.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Transfers per receiver (the median is reported).")
@click.option("--max-pdu", type=click.IntRange(4096, 131072), default=131072, show_default=True,
              help="Max PDU of every receiver and of storescu (dcmtk accepts 4096..131072).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (includes the table).")
def bench_receive(count: int, size_mib: float, rounds: int, max_pdu: int, as_json: bool) -> None:
    """Receive throughput and RSS of the node's SCP vs dcmtk's storescp on the same files."""
    from cxr_sr_node.bench import BenchError, receive_benchmark

    try:
        result = receive_benchmark(count=count, size_mib=size_mib, rounds=rounds, max_pdu=max_pdu)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else result["table"])


@bench.command("pipeline")
@click.option("--images", type=click.IntRange(min=1), default=3, show_default=True, help="Chest images to send.")
@checkpoint_option
@click.option("--series-idle-s", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="The node's series_idle_s.")
@click.option("--no-forward-reference", is_flag=True, help="Skip timing the model alone in this process.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (includes the table).")
def bench_pipeline(images: int, checkpoint: Path | None, series_idle_s: float, no_forward_reference: bool,
                   as_json: bool) -> None:
    """End-to-end round trip per image: storescu -> node -> super-resolve -> storescp."""
    from cxr_sr_node.bench import BenchError, pipeline_benchmark

    try:
        result = pipeline_benchmark(images=images, checkpoint=checkpoint, series_idle_s=series_idle_s,
                                    forward_reference=not no_forward_reference)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else result["table"])


def _mount_model_group() -> None:
    from model.cli import model_group  # the CLI is the one place both packages meet

    main.add_command(model_group, "model")


_mount_model_group()

if __name__ == "__main__":
    main()
