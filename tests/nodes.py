"""Running the node under test: a tiny real checkpoint and an in-process embedded Node."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from cxr_sr_node.config import NodeConfig, load_config
from tests.peers import free_port, wait_until


def make_tiny_checkpoint(path: Path) -> Path:
    """A real (random-weight) CSAEGAN small enough for plumbing tests; its output is bicubic plus a
    fixed random residual, so it is visibly not a bicubic copy."""
    from model.inference import write_untrained_checkpoint

    return write_untrained_checkpoint(path, name="test-tiny", residual_std=0.3)


def node_config(tmp_path: Path, checkpoint: Path, **settings) -> NodeConfig:
    flags = {"port": free_port(), "bind_address": "127.0.0.1", "spool": tmp_path / "spool",
             "checkpoint": checkpoint, "device": "cpu", "series_idle_s": 0.3, "min_free_disk_mb": 1,
             "send_backoff_s": 0.2, "tile": 128, "log_level": "info", **settings}
    return load_config(environ={}, flags=flags)


@contextmanager
def running_node(config: NodeConfig) -> Iterator:
    from cxr_sr_node.node import Node

    node = Node(config)
    node.start(wait_for_workers_s=120)
    try:
        yield node
    finally:
        node.stop(worker_grace_s=30)


def wait_for_jobs_done(node, n: int, deadline_s: float = 120.0) -> list:
    """Wait until ``n`` jobs are done or failed (no job waiting or running)."""

    def finished():
        jobs = node.spool.jobs()
        ended = [j for j in jobs if j.state in ("done", "failed")]
        return ended if len(ended) >= n else None

    return wait_until(finished, deadline_s, f"{n} finished job(s) in {node.spool.root}")


def with_new_uids(src: Path, dest: Path, *, study: str | None = None, series: str | None = None, **changes) -> Path:
    """Copy a DICOM file with fresh (or given) Study/Series/SOP Instance UIDs and other changes."""
    ds = pydicom.dcmread(src, force=True)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # a bare data set: implicit VR LE
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest
