"""``cxr-sr-node check``: can this configuration run? Each check names what failed and what to do."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from cxr_sr_node.config import NodeConfig, redacted_url

Check = tuple[str, bool, str]


def run_checks(config: NodeConfig, *, load_model: bool = True, echo_dest: bool = True) -> Iterator[Check]:
    if config.dest is not None:
        dest = str(config.dest)
    elif config.return_to_sender and config.peers:
        dest = f"none; back to the sender for {len(config.peers)} peer(s), others kept in spool/done"
    else:
        dest = "none (output kept in spool/done)"
    yield "config", True, f"AE {config.ae_title} port {config.port}, dest {dest}"
    yield _check_spool(config)
    if config.runner == "celery":
        yield check_broker(config)
    if config.tls_cert is not None:
        yield _check_tls(config)
    if load_model:
        yield _check_model(config)
    if config.dest is not None and echo_dest:
        yield _check_dest(config)


def _check_spool(config: NodeConfig) -> Check:
    """Writable, with free space; never created here (a mistyped or unmounted spool must not pass
    as a healthy empty one)."""
    root = Path(config.spool)
    existing = root
    while not existing.exists() and existing != existing.parent:  # where serve would create it
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        probe = existing / f".check-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return "spool", False, f"{existing} is not writable ({exc}); fix its permissions or choose another --spool"
    free_mb = shutil.disk_usage(existing).free // 2**20
    if free_mb < config.min_free_disk_mb:
        return "spool", False, f"{free_mb} MiB free at {root}, below min_free_disk_mb={config.min_free_disk_mb}; free space"
    if existing != root:
        return "spool", True, f"{root} does not exist yet: serve creates it ({existing} writable, {free_mb} MiB free)"
    used = "" if (root / "jobs.sqlite").is_file() else " (no node has used it yet: no jobs.sqlite)"
    return "spool", True, f"{root} writable, {free_mb} MiB free{used}"


def check_broker(config: NodeConfig) -> Check:
    """runner = "celery": the broker answers and the queues exist (declared, idempotent, as the node does)."""
    from cxr_sr_node.queue import declare, make_app

    shown = redacted_url(config.broker_url)
    try:
        waiting = declare(make_app(config), timeout_s=5.0)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: kombu/amqp raise many kinds
        return "broker", False, (f"{shown} cannot be reached ({type(exc).__name__}: {exc}); start RabbitMQ "
                                 "or fix broker_url (CXRSR_BROKER_URL)")
    return "broker", True, f"{shown}: messages waiting " + ", ".join(f"{q} {n}" for q, n in waiting.items())


def _check_tls(config: NodeConfig) -> Check:
    from cxr_sr_node.scp import server_tls_context

    try:
        server_tls_context(config)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return "tls", False, (f"tls_cert {config.tls_cert} / tls_key {config.tls_key}"
                              f"{f' / tls_ca {config.tls_ca}' if config.tls_ca else ''} cannot be loaded ({exc}); "
                              "give a PEM certificate, its private key and (for client certificates) a PEM CA file")
    return "tls", True, f"certificate {config.tls_cert} loaded" + (", client certificates required" if config.tls_ca else "")


def _check_model(config: NodeConfig) -> Check:
    try:
        from model.inference import load_generator

        loaded = load_generator(config.checkpoint, config.device)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return "model", False, f"{exc}"
    return "model", True, f"{loaded.card.name} {loaded.card.version} sha256 {loaded.sha256[:12]} on {loaded.device}"


def _check_dest(config: NodeConfig) -> Check:
    from cxr_sr_node.send import SendError, echo

    try:
        status = echo(config.dest, calling_ae=config.ae_title, timeout_s=10)
    except (SendError, OSError) as exc:
        return "dest", False, f"C-ECHO to {config.dest} failed: {exc}"
    return "dest", status == 0, f"C-ECHO to {config.dest}: 0x{status:04X}"
