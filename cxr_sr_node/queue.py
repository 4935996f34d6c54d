"""The distributed runner (DESIGN §7): Celery on RabbitMQ, with the spool as the source of truth.

The node (``serve --runner celery``) receives, forms jobs in the spool, and publishes a ``process``
message per job; ``cxr-sr-node worker`` processes consume them. A message carries the job id and
the spool's URI (``file:///srv/spool``), never pixels: the node and every worker mount the spool at
the same path on shared storage, and the job's state lives in its SQLite row there.

Queues (durable, on the direct exchange ``cxr-sr``; persistent messages, publisher confirms):

- ``gpu``: ``process(job_id, spool_uri)``. One worker per GPU, ``CUDA_VISIBLE_DEVICES`` set by the
  operator, solo pool, concurrency 1, prefetch 1: a worker holds exactly the job it runs. It claims
  *that* job in the spool (``Spool.claim_job``), runs the embedded worker's ``process_job`` with
  the model it loaded once, records the outcome, and publishes ``send``.
- ``send``: ``send(job_id, spool_uri)``. CPU workers, so a slow or unreachable PACS never holds
  a GPU; one attempt per message, retries re-published with the backoff as countdown.
- ``dead``: the dead-letter queue (exchange ``cxr-sr.dead``), where RabbitMQ puts messages a task
  rejected: those of jobs the spool dead-lettered (``failed/``, ``cxr-sr-node retry``), and
  messages naming a spool or job this worker cannot find. It is for inspection; ``failed/`` in
  the spool is what ``retry`` works from. Kept bounded (oldest dropped past ``DEAD_MAX_LENGTH``).

Delivery is at least once, so every task is idempotent against the spool: a duplicate finds its
job done, failed, or held under a live lease, and acks without doing anything; a second run of the
same job writes the same files (output UIDs are deterministic) and skips outputs already there.

Settings that matter, and why:

- ``task_acks_late``: a message is acked when the task returns, not when it starts, so a worker
  that dies mid-job (``kill -9``, OOM, power) leaves the message unacked and RabbitMQ hands it to
  another worker. That redelivery (``redelivered`` flag) is how the next worker knows the holder is
  gone and takes the job over at once, instead of waiting for the lease to expire.
- ``task_reject_on_worker_lost``: the same for a prefork child that dies while its parent lives
  (with the solo pool the whole worker dies, its connection closes, and RabbitMQ requeues).
- ``worker_prefetch_multiplier = 1`` and concurrency 1: no GPU worker sits on queued jobs another
  idle GPU could take.
- ``broker_heartbeat = 0``: the solo pool runs the job on the thread that would send AMQP
  heartbeats, so during a long job RabbitMQ would declare the worker dead, close its connection
  and hand the job to another worker while the first still runs. Dead workers are seen instead by
  the closed socket (crash, kill), TCP keepalive (py-amqp: ~2.5 min for a vanished host),
  RabbitMQ's ``consumer_timeout``, and the spool's lease (the node re-publishes expired leases).
- RabbitMQ ``consumer_timeout`` (``deploy/rabbitmq/rabbitmq.conf``) must be above the longest job
  plus the longest send backoff: past it RabbitMQ closes the worker's channel and requeues the
  message although the job is still running.
- Not the Redis broker: with Redis, an unacked message comes back after the transport's
  ``visibility_timeout`` (1 h by default) whether or not its worker is alive, so with late acks a
  long job runs twice; and a Redis restart without AOF loses queued messages. The config refuses
  non-AMQP broker URLs.

Nothing here imports torch; a ``gpu`` worker loads the model through ``worker.Engine.load``, a
``send`` worker never does. Caveat: the job table is SQLite in WAL mode, which needs every process
that opens it on the same host (WAL uses shared memory); across hosts the spool's database must
not sit on NFS/SMB. The compose file (one host, several GPUs, a shared volume) meets that.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kombu import Exchange, Queue

from cxr_sr_node.config import NodeConfig, redacted_url
from cxr_sr_node.logs import configure_logging, get_logger
from cxr_sr_node.spool import Spool

log = get_logger("cxr_sr_node.queue")

PROCESS_TASK = "cxr_sr_node.process"
SEND_TASK = "cxr_sr_node.send"
GPU_QUEUE, SEND_QUEUE, DEAD_QUEUE = "gpu", "send", "dead"
WORK_QUEUES = (GPU_QUEUE, SEND_QUEUE)
DEAD_MAX_LENGTH = 100_000  # messages kept in the dead-letter queue; the oldest are dropped past this

_EXCHANGE = Exchange("cxr-sr", type="direct", durable=True)
_DEAD_EXCHANGE = Exchange("cxr-sr.dead", type="direct", durable=True)


def queue_for_stage(stage: str) -> str:
    return {"process": GPU_QUEUE, "send": SEND_QUEUE}[stage]


def topology() -> tuple[Queue, ...]:
    """The work queues (dead-lettering to ``dead``) and the dead-letter queue itself.

    Node and workers must declare them with the same arguments (RabbitMQ refuses a redeclaration
    that differs), so both build them here."""
    dead_letter = {"x-dead-letter-exchange": _DEAD_EXCHANGE.name, "x-dead-letter-routing-key": DEAD_QUEUE}
    work = tuple(Queue(name, _EXCHANGE, routing_key=name, durable=True, queue_arguments=dead_letter)
                 for name in WORK_QUEUES)
    dead = Queue(DEAD_QUEUE, _DEAD_EXCHANGE, routing_key=DEAD_QUEUE, durable=True,
                 queue_arguments={"x-max-length": DEAD_MAX_LENGTH})
    return (*work, dead)


def spool_uri(root: Path) -> str:
    """The spool as a storage URI for messages: ``file:///srv/spool``."""
    return Path(root).resolve().as_uri()


def spool_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise ValueError(f"spool_uri: expected file:///PATH (a shared filesystem path), got {uri!r}")
    return Path(unquote(parsed.path))


def make_app(config: NodeConfig) -> Any:
    """A Celery app for ``config``: broker, queues and routes, and the two tasks bound to a
    per-process :class:`WorkerState`. Built on demand; nothing is configured at import time."""
    from celery import Celery

    app = Celery("cxr_sr_node", set_as_current=False)
    queues = topology()
    app.conf.update(
        broker_url=config.broker_url,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=0,  # see the module docstring: the solo pool cannot heartbeat during a job
        broker_transport_options={"confirm_publish": True},  # publish returns once RabbitMQ has it
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,  # its message comes back anyway
        task_queues=queues,
        task_default_queue=GPU_QUEUE,
        task_default_exchange=_EXCHANGE.name,
        task_default_routing_key=GPU_QUEUE,
        task_create_missing_queues=False,
        task_routes={PROCESS_TASK: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                     SEND_TASK: {"queue": SEND_QUEUE, "routing_key": SEND_QUEUE}},
        task_default_delivery_mode="persistent",
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0,
                                   "interval_max": 2.0},  # bounded: the scheduler must not hang
        task_send_sent_event=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    state = WorkerState(config)
    app.cxr_state = state

    @app.task(name=PROCESS_TASK, bind=True, acks_late=True, ignore_result=True)
    def process(task: Any, job_id: str, spool_uri: str) -> str:
        return state.process(job_id, spool_uri, redelivered=_redelivered(task), app=app)

    @app.task(name=SEND_TASK, bind=True, acks_late=True, ignore_result=True)
    def send(task: Any, job_id: str, spool_uri: str) -> str:
        return state.send(job_id, spool_uri, redelivered=_redelivered(task), app=app)

    return app


def _redelivered(task: Any) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


def publish(app: Any, stage: str, job_id: str, uri: str, *, countdown: float | None = None) -> None:
    task = PROCESS_TASK if stage == "process" else SEND_TASK
    app.send_task(task, args=[job_id, uri], queue=queue_for_stage(stage), routing_key=queue_for_stage(stage),
                  countdown=countdown if countdown and countdown > 0 else None, retry=True)


def declare(app: Any, *, timeout_s: float = 5.0) -> dict[str, int]:
    """Declare exchanges and queues (idempotent); returns the messages waiting in each queue
    (``gpu``, ``send``, ``dead``; ready ones, not those a worker holds)."""
    waiting = {}
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout_s)
        channel = conn.default_channel
        for queue in topology():
            bound = queue.bind(channel)
            bound.declare()  # exchange, queue, binding
            _, waiting[queue.name], _ = bound.queue_declare(passive=True)
    return waiting


class Publisher:
    """The node's side: publishes ``process``/``send`` for the jobs of its spool. Not thread-safe;
    the node uses it from the scheduler thread only."""

    def __init__(self, config: NodeConfig) -> None:
        self.app = make_app(config)
        self.spool_uri = spool_uri(config.spool)

    def declare(self) -> dict[str, int]:
        return declare(self.app)

    def publish(self, stage: str, job_id: str) -> None:
        publish(self.app, stage, job_id, self.spool_uri)

    def close(self) -> None:
        self.app.close()


class WorkerState:
    """What a worker process keeps between tasks: its config, the spools it opened, and (gpu
    queue only) the model, loaded once on the first ``process`` task or by :meth:`load_engine`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._spools: dict[Path, Spool] = {}
        self._engine: Any = None
        self._lock = threading.Lock()

    def load_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                from cxr_sr_node.worker import Engine

                self._engine = Engine.load(self.config)
                log.info("worker.model_loaded", pid=os.getpid(), model=self._engine.model.name,
                         model_sha256=self._engine.model.sha256[:12],
                         device=str(getattr(self._engine.upscale, "device", "cpu")))
        return self._engine

    def spool(self, uri: str) -> Spool:
        """The spool a message names; it must exist (an unmounted share must not become an empty spool)."""
        root = spool_path(uri)
        if root not in self._spools:
            if not (root / "jobs.sqlite").is_file():
                raise FileNotFoundError(f"no spool at {root} (from {uri}); is the shared storage mounted here?")
            self._spools[root] = Spool(root)
        return self._spools[root]

    def _open(self, task: str, job_id: str, uri: str) -> tuple[Spool, Any]:
        """The spool and the job's current row; an unknown spool or job rejects the message to
        the dead-letter queue (requeueing could only loop)."""
        from celery.exceptions import Reject

        try:
            spool = self.spool(uri)
            return spool, spool.get(job_id)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            reason = str(exc.args[0]) if exc.args else str(exc)
            log.error("task.rejected", task=task, job_id=job_id, spool_uri=uri, reason=reason)
            raise Reject(reason, requeue=False) from None

    # --- the tasks -------------------------------------------------------------------------------
    def process(self, job_id: str, uri: str, *, redelivered: bool, app: Any) -> str:
        """Claim the job, derive its outputs like the embedded worker (``worker.run_claimed``), then publish ``send``."""
        from celery.exceptions import Reject

        from cxr_sr_node.worker import run_claimed

        cfg = self.config
        spool, before = self._open("process", job_id, uri)
        engine = self.load_engine()  # before claiming: a model that fails to load costs no attempt
        job = spool.claim_job(job_id, stage="process", lease_s=cfg.lease_s, max_attempts=cfg.max_attempts,
                              take_over=redelivered)
        if job is None:
            after = spool.get(job_id)
            if after.state == "failed" and before.state != "failed":  # this delivery dead-lettered it
                log.error("job.failed", job_id=job_id, reason=after.reason, state="failed")
                raise Reject(after.reason, requeue=False)
            log.info("task.duplicate", task="process", job_id=job_id, state=after.state, redelivered=redelivered)
            return "duplicate"
        state, result = run_claimed(job, spool, engine, cfg)
        if state == "failed":
            raise Reject(spool.get(job.job_id).reason, requeue=False)
        if state == "ready":  # retry after the backoff the spool set
            self._publish_next(app, "process", spool, job.job_id, uri)
        elif state == "processed" and result["processed"]:
            self._publish_next(app, "send", spool, job.job_id, uri)
        return state

    def send(self, job_id: str, uri: str, *, redelivered: bool, app: Any) -> str:
        """One send attempt, as the embedded sender makes it (``node.send_job``)."""
        from celery.exceptions import Reject

        from cxr_sr_node.node import send_job

        cfg = self.config
        spool, _ = self._open("send", job_id, uri)
        job = spool.claim_job(job_id, stage="send", lease_s=cfg.lease_s, max_attempts=cfg.send_retries + 1,
                              take_over=redelivered)
        if job is None:
            log.info("task.duplicate", task="send", job_id=job_id, state=spool.get(job_id).state,
                     redelivered=redelivered)
            return "duplicate"
        outcome = send_job(spool, cfg, job)
        if outcome == "failed":
            raise Reject(spool.get(job_id).reason, requeue=False)
        if outcome == "retry":
            self._publish_next(app, "send", spool, job_id, uri)
        return outcome

    @staticmethod
    def _publish_next(app: Any, stage: str, spool: Spool, job_id: str, uri: str) -> None:
        """Publish the job's next step (after its backoff, if any). A failure only delays the job:
        the node's reconciler publishes jobs that wait without a message."""
        countdown = spool.get(job_id).not_before - time.time()
        try:
            publish(app, stage, job_id, uri, countdown=countdown)
        except Exception as exc:  # noqa: BLE001 - any broker error; the spool keeps the truth
            log.warning("queue.publish_failed", job_id=job_id, stage=stage, reason=f"{type(exc).__name__}: {exc}")


# --- the worker process ------------------------------------------------------------------------

def run_worker(config: NodeConfig, queues: tuple[str, ...]) -> int:
    """Run a Celery worker in this process (solo pool, concurrency 1, fair) consuming ``queues``.

    A ``gpu`` worker loads the model before it consumes anything (a broken checkpoint stops it
    here, not at the first job). SIGTERM is Celery's warm shutdown: the current job finishes, then
    the worker exits; anything else stays in the queue and the spool."""
    from celery import signals

    unknown = sorted(set(queues) - set(WORK_QUEUES))
    if not queues or unknown:
        raise ValueError(f"queues: expected gpu, send or gpu,send, got {','.join(queues)!r}")

    def keep_our_logging(**_: Any) -> None:  # a receiver here stops Celery from configuring logging
        configure_logging(config.log_level, json=config.log_json)
        # Celery's own INFO lines repeat our job events; keep its warnings and errors
        logging.getLogger("celery").setLevel(logging.DEBUG if config.log_level == "debug" else logging.WARNING)

    name = f"{'+'.join(queues)}.{os.getpid()}@{socket.gethostname()}"

    def announce_ready(**_: Any) -> None:
        log.info("worker.ready", nodename=name, queues=list(queues))

    signals.setup_logging.connect(keep_our_logging, weak=False)
    signals.worker_ready.connect(announce_ready, weak=False)
    log.info("worker.started", pid=os.getpid(), queues=list(queues), nodename=name, spool=str(config.spool),
             cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not (Path(config.spool) / "jobs.sqlite").is_file():  # messages name their spool; this is a hint
        log.warning("spool.missing", spool=str(config.spool),
                    note="no job table there: is the node's shared spool mounted at the same path?")
    app = make_app(config)
    if GPU_QUEUE in queues:
        app.cxr_state.load_engine()
    _wait_for_broker(app)
    worker = app.Worker(hostname=name, queues=list(queues), pool="solo", concurrency=1, optimization="fair",
                        prefetch_multiplier=1, loglevel=config.log_level.upper(), quiet=True,
                        without_gossip=True, without_mingle=True, without_heartbeat=True)
    worker.start()
    log.info("worker.stopped", pid=os.getpid(), exitcode=worker.exitcode, torch_loaded="torch" in sys.modules)
    return worker.exitcode or 0


def _wait_for_broker(app: Any) -> None:
    """Declare the topology (the dead-letter exchange must exist before anything is rejected),
    waiting for the broker as long as it takes, with a log line per try."""
    from amqp.exceptions import AccessRefused, NotAllowed

    attempt = 0
    while True:
        try:
            declare(app)
            return
        except (AccessRefused, NotAllowed) as exc:  # wrong user/password or vhost: waiting will not fix it
            raise RuntimeError(f"broker {redacted_url(app.conf.broker_url)} refused this worker ({type(exc).__name__}: {exc}); fix the user, "
                               "password or vhost in broker_url (CXRSR_BROKER_URL)") from None
        except Exception as exc:  # noqa: BLE001 - broker not up yet: wait and try again
            attempt += 1
            log.warning("queue.unavailable", attempt=attempt, reason=f"{type(exc).__name__}: {exc}")
            time.sleep(min(2.0 * attempt, 30.0))
