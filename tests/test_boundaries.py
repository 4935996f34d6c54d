"""Imports run one way: the node uses only model's inference API (and mounts its CLI group);
model never imports the node; the receive path never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_FROM_NODE = {"model.inference", "model.cli"}


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_model_never_imports_the_node():
    offenders = {f: n for f, n in imported_modules("model").items() if any(m.split(".")[0] == "cxr_sr_node" for m in n)}
    assert offenders == {}


def test_node_uses_only_the_inference_api_of_model():
    offenders = {
        f: sorted(m for m in names if m.split(".")[0] == "model" and m not in ALLOWED_FROM_NODE)
        for f, names in imported_modules("cxr_sr_node").items()
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_receive_path_never_imports_torch(tmp_path):
    """Start the SCP, receive a real file, and check torch was never loaded in that process."""
    script = f"""
import sys, shutil
from pathlib import Path
import cxr_sr_node.cli, cxr_sr_node.node, cxr_sr_node.scp, cxr_sr_node.spool, cxr_sr_node.worker
from cxr_sr_node.config import load_config
from cxr_sr_node.scp import SeriesTracker, StorageSCP
from cxr_sr_node.spool import Spool
from tests.peers import free_port
from pynetdicom import AE
import pydicom
cfg = load_config(environ={{}}, flags={{"port": free_port(), "bind_address": "127.0.0.1",
                                      "spool": Path({str(tmp_path)!r}) / "spool", "min_free_disk_mb": 1}})
scp = StorageSCP(cfg, Spool(cfg.spool), SeriesTracker())
scp.start()
ds = pydicom.dcmread({str(ROOT.parent / "shared" / "data" / "dicom" / "chest" / "test1.dcm")!r})
ae = AE(ae_title="MODALITY")
ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
assoc = ae.associate("127.0.0.1", cfg.port, ae_title="CXRSR")
status = assoc.send_c_store(ds)
assoc.release()
scp.stop()
assert status.Status == 0, status
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if loaded else "NO-TORCH", len(loaded))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NO-TORCH" in result.stdout
