"""One configuration object, merged once: defaults < TOML file < ``CXRSR_*`` environment < flags.

Every key has the same name in all four places (``series_idle_s`` in TOML, ``CXRSR_SERIES_IDLE_S``
in the environment, ``--series-idle-s`` where a flag exists). A bad value is a one-line
``ConfigError`` naming the key, where it came from, what was expected and what was found.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "CXRSR_"
_AE_RE = re.compile(r"^[ -~]{1,16}$")
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MIN_TILE = 32  # model.inference.Upscaler's min_tile: the smallest tile it falls back to (tests pin the two together)
# Settings written into every derived image, with their VR's length limit (PS3.5 6.2).
_TEXT_LIMITS = {"station_name": ("SH", 16), "institution_name": ("LO", 64)}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line naming the key."""


def redacted_url(url: str) -> str:
    """``url`` with its user:password replaced by ``***``, for messages and logs."""
    return re.sub(r"//[^@/]*@", "//***@", url)


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, key: str = "dest") -> Peer:
        m = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if not m:
            raise ConfigError(f"{key}: expected AE@HOST:PORT (e.g. ORTHANC@pacs:4242), got {text!r}")
        ae, host, port = m.group(1), m.group(2), int(m.group(3))
        _check_ae(ae, key)
        if not 0 < port < 65536:
            raise ConfigError(f"{key}: port must be 1-65535, got {port}")
        return cls(ae, host, port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class AllowRule:
    """A calling AE allowed to store, optionally pinned to a host (``AE`` or ``AE@HOST``)."""

    ae_title: str
    host: str | None = None

    @classmethod
    def parse(cls, text: str, *, key: str = "allow") -> AllowRule:
        ae, at, host = text.strip().partition("@")
        _check_ae(ae, key)
        if at and not host.strip():
            raise ConfigError(f"{key}: {text.strip()!r} names no host after '@'; write AE or AE@HOST")
        return cls(ae, host.strip() or None)

    def matches(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        try:
            allowed = {info[4][0] for info in socket.getaddrinfo(self.host, None)}
        except OSError:
            allowed = {self.host}
        return address in allowed


def _check_ae(ae: str, key: str) -> None:
    if not _AE_RE.match(ae) or ae != ae.strip() or "\\" in ae:
        raise ConfigError(f"{key}: AE title must be 1-16 printable characters without '\\', got {ae!r}")


def default_device_uid() -> str:
    """Stable per host: a 2.25 UID from the host name, so our own output is recognised after restarts."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_DNS, 'cxr-sr-node.' + socket.gethostname()).int}"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    # network
    ae_title: str = "CXRSR"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    dest: Peer | None = None
    allow: tuple[AllowRule, ...] = ()  # empty: any calling AE may store (a warning is logged)
    peers: Mapping[str, Peer] = field(default_factory=dict)  # known AEs for return_to_sender
    return_to_sender: bool = False
    max_associations: int = 10
    max_pdu: int = 262144  # bytes; 0 = unlimited
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    tls_cert: Path | None = None  # PEM certificate (chain) of this node: the SCP then speaks DICOM TLS only
    tls_key: Path | None = None  # PEM private key for tls_cert
    tls_ca: Path | None = None  # PEM CA bundle: when set, callers must present a certificate it signed
    max_instance_mb: int = 1024
    min_free_disk_mb: int = 1024
    # Accept every storage SOP Class, private and unknown ones too (pynetdicom's unrestricted storage
    # service: the SCU's first proposed transfer syntax is taken); they are stored and skipped. Off:
    # only the standard storage classes are negotiated, each with every decodable transfer syntax.
    accept_any_sop_class: bool = True
    reject_ineligible: bool = False
    require_body_part: bool = False
    # spool and jobs
    spool: Path = Path("spool")
    series_idle_s: float = 5.0
    series_max_wait_s: float = 600.0
    max_attempts: int = 3
    lease_s: float = 900.0
    keep_done_days: float = 7.0
    send_retries: int = 10  # with send_backoff_s 2 (doubling, at most 5 min apart): ~18 min, a PACS restart
    send_backoff_s: float = 2.0
    # model
    device: str = "auto"
    checkpoint: Path | None = None  # None: the shipped default checkpoint
    tile: int = 256
    overlap: int = 16
    max_output_px: int = 4096
    workers: int = 1  # worker processes, one per GPU (worker i gets GPU i mod N with device auto|cuda); 0 = receive only
    # runner: "embedded" (worker processes of this node) or "celery" (workers elsewhere, via RabbitMQ;
    # the spool must then be on storage the node and the workers share)
    runner: str = "embedded"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    # identity and operations
    device_uid: str = field(default_factory=default_device_uid)
    station_name: str = ""
    institution_name: str = ""
    http_port: int = 0  # /healthz and /metrics; 0 = off
    log_level: str = "info"
    log_json: bool | None = None  # None: JSON when stderr is not a TTY

    def __post_init__(self) -> None:
        _check_ae(self.ae_title, "ae_title")
        for key in ("port", "http_port"):
            v = getattr(self, key)
            if not 0 <= v < 65536 or (key == "port" and v == 0):
                raise ConfigError(f"{key}: must be a TCP port 1-65535, got {v}")
        positive = ("max_associations", "max_attempts", "tile", "max_output_px", "max_instance_mb")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        non_negative = ("workers", "series_idle_s", "series_max_wait_s", "send_retries", "send_backoff_s",
                        "overlap", "min_free_disk_mb", "max_pdu", "keep_done_days", "lease_s")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key: set both (TLS) or neither (plain TCP)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_ca: client certificates can only be checked when tls_cert and tls_key are set")
        for key in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{key}: file {path} does not exist")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: expected debug, info, warning or error, got {self.log_level!r}")
        if self.runner not in ("embedded", "celery"):
            raise ConfigError(f"runner: expected embedded or celery, got {self.runner!r}")
        if not re.match(r"(py)?amqps?://", self.broker_url):
            raise ConfigError(f"broker_url: expected an amqp:// or amqps:// URL (RabbitMQ; Redis is not supported), "
                              f"got {redacted_url(self.broker_url)!r}")
        if self.max_output_px < 4 * 16:
            raise ConfigError(f"max_output_px: must be at least 64, got {self.max_output_px}")
        if self.tile < MIN_TILE:
            raise ConfigError(f"tile: must be at least {MIN_TILE} (input pixels), got {self.tile}")
        if self.overlap >= self.tile:
            raise ConfigError(f"overlap: must be less than tile ({self.tile}), got {self.overlap}")
        if len(self.device_uid) > 64 or not _UID_RE.fullmatch(self.device_uid):
            raise ConfigError(f"device_uid: must be a DICOM UID (digits and dots, at most 64 characters, e.g. "
                              f"2.25.<decimal UUID>), got {self.device_uid!r}")
        for key, (vr, limit) in _TEXT_LIMITS.items():
            text = getattr(self, key)
            if len(text) > limit or "\\" in text or any(ord(c) < 32 for c in text):
                raise ConfigError(f"{key}: written as {vr} into every derived image, so at most {limit} characters "
                                  f"without backslashes or control characters; got {len(text)} characters {text!r}")


# --- merging ---------------------------------------------------------------------------------

def _coerce(key: str, value: Any, source: str) -> Any:
    """Turn a TOML / environment / flag value into the field's type, or fail naming the key."""
    special = _SPECIAL_COERCERS.get(key)
    if special is not None:
        return special(value, source, f"{key} (from {source})")
    f = _FIELDS[key]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    coerce = _TYPED_COERCERS.get(kind.removesuffix(" | None"))
    if coerce is None:
        return value
    try:
        return coerce(value, "None" in kind)
    except (ValueError, TypeError):
        raise ConfigError(f"{key} (from {source}): expected {kind}, got {value!r}") from None


def _coerce_dest(value: Any, source: str, where: str) -> Peer | None:
    return None if value in (None, "") else (value if isinstance(value, Peer) else Peer.parse(str(value), key=where))


def _coerce_allow(value: Any, source: str, where: str) -> tuple[AllowRule, ...]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{where}: expected a list of \"AE\" or \"AE@HOST\" strings, got {value!r}")
    for v in items:
        if not isinstance(v, str | AllowRule):
            raise ConfigError(f"{where}: expected \"AE\" or \"AE@HOST\" strings, got {v!r}")
    return tuple(v if isinstance(v, AllowRule) else AllowRule.parse(v, key=where) for v in items if str(v).strip())


def _coerce_peers(value: Any, source: str, where: str) -> dict[str, Peer]:
    if isinstance(value, str):  # env: "AE@HOST:PORT,AE2@HOST:PORT"
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, Mapping):  # TOML table: AE = "HOST:PORT"
        for ae, addr in value.items():
            if not isinstance(addr, str) or ":" not in addr:
                raise ConfigError(f"peers.{ae} (from {source}): expected \"HOST:PORT\", got {addr!r}")
        peers = [Peer.parse(f"{ae}@{addr}", key=f"peers.{ae} (from {source})") for ae, addr in value.items()]
    elif not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a table of AE = \"HOST:PORT\" or a list of \"AE@HOST:PORT\", "
                          f"got {value!r}")
    else:
        peers = [p if isinstance(p, Peer) else Peer.parse(str(p), key=where) for p in value]
    return {p.ae_title: p for p in peers}


def _to_path(value: Any, optional: bool) -> Path | None:
    return None if optional and value in (None, "") else Path(str(value)).expanduser()


def _to_bool(value: Any, optional: bool) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if optional and text in ("", "auto", "none"):
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _to_int(value: Any, optional: bool) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _to_float(value: Any, optional: bool) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_str(value: Any, optional: bool) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(value)
    return str(value)


_SPECIAL_COERCERS = {"dest": _coerce_dest, "allow": _coerce_allow, "peers": _coerce_peers}
_TYPED_COERCERS = {"Path": _to_path, "bool": _to_bool, "int": _to_int, "float": _to_float, "str": _to_str}


_FIELDS = {f.name: f for f in fields(NodeConfig)}


def _apply(base: dict[str, Any], values: Mapping[str, Any], source: str) -> None:
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{key} (from {source}): unknown setting; known settings: {', '.join(sorted(_FIELDS))}")
        base[key] = _coerce(key, value, source)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML ({exc})") from None
    node = data.pop("node", None)
    if node is not None and not isinstance(node, dict):
        raise ConfigError(f"config: in {path}, node must be a table ([node] followed by its settings), got {node!r}")
    if node is not None:  # allow everything under a [node] table, or at the top level
        data = {**node, **data}
    return data


def environment_values(environ: Mapping[str, str]) -> dict[str, str]:
    return {k[len(ENV_PREFIX):].lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k != "CXRSR_CONFIG"}


def load_config(
    *,
    toml_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Merge defaults < TOML < ``CXRSR_*`` environment < flags (flags that are None are unset)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    toml_path = toml_path or (Path(environ["CXRSR_CONFIG"]) if environ.get("CXRSR_CONFIG") else None)
    layers = [(read_toml(toml_path), str(toml_path))] if toml_path is not None else []
    layers += [(environment_values(environ), "environment"),
               ({k: v for k, v in (flags or {}).items() if v is not None and v != ()}, "command line")]
    for values, source in layers:
        _apply(merged, values, source)
        sources.update(dict.fromkeys(values, source))
    try:
        return NodeConfig(**merged)
    except ConfigError as exc:
        raise ConfigError(_with_source(str(exc), sources)) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _with_source(message: str, sources: Mapping[str, str]) -> str:
    """``port: must be …`` -> ``port (from cxr.toml): must be …``, for a key that was set somewhere."""
    key, colon, rest = message.partition(":")
    if colon and key in sources:
        return f"{key} (from {sources[key]}):{rest}"
    return message


def with_changes(config: NodeConfig, **changes: Any) -> NodeConfig:
    return replace(config, **changes)
