"""The RQ worker `leadscore worker` runs (the Procfile's `worker:` line).

A worker may be SIGKILLed at any instant (an OOM kill, a lost host, a deploy). RQ finds a job its
dead worker was running and retries it, but two instants lost the job without a trace; both are
closed here, so a job is always in a queue, in its queue's intermediate list, or filed as running:
- between taking a job off one of several queues and filing it as running: RQ parks a taken job
  in its queue's intermediate list, where maintenance finds it, only for a worker of one queue,
  and ours take from two (live, then backfill);
- between filing it as running and its work horse marking it started: RQ's abandoned-job cleanup
  retries only jobs marked started (rq/rq#2466), and the work horse marks it after the fork.
A warm stop (SIGTERM, a deploy) landing between taking a job and filing it waits until the job is
filed, then lets it finish: RQ would stop at once and leave the job parked, found only by a
maintenance a minute or two later, one of its retries spent.
"""

from __future__ import annotations

import signal
import time
from contextvars import ContextVar

from redis import Redis
from rq import Queue, Worker
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.utils import as_text, get_version
from rq.worker import WorkerStatus

from integration import pending
from workers.batch import sweep

JOB_MONITORING_S = 5  # heartbeat: a killed worker's job is retried about a minute later
BACKFILL_POLL_S = 1.0  # an idle worker blocks on the live queue; it looks at the backfill this often

_taker: ContextVar[LeadscoreWorker | None] = ContextVar("leadscore_taker", default=None)


class LeadscoreQueue(Queue):
    """A queue whose workers park each job they take in its queue's intermediate list, whatever
    their number of queues, in the order given (live first)."""

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, **fetch_options):
        queues = list(queues)
        if get_version(connection) < (6, 2, 0):  # no LMOVE: RQ's own (BLPOP) way
            return super().dequeue_any(queues, timeout, connection, **fetch_options)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            taken = _take(queues, deadline, connection)
            if taken is None:
                if deadline is None:
                    return None
                raise DequeueTimeout(timeout, [queue.key for queue in queues])
            found = cls._fetch_dequeued_job(connection, *taken, **fetch_options)
            if found is not None:  # else the job was deleted; maintenance clears its id from the list
                return found
            _release_warm_stop(_taker.get())


def _take(queues: list[Queue], deadline: float | None, connection: Redis) -> tuple[str, str] | None:
    """(queue key, job id) of the first job of the first queue that has one, moved to that queue's
    intermediate list; waits until `deadline` (None: not at all), blocked on the first queue."""
    worker = _taker.get()
    while True:
        for queue in queues:
            job_id = _move(worker, connection.lmove, queue.key, queue.intermediate_queue_key)
            if job_id is not None:
                return queue.key, as_text(job_id)
        left = None if deadline is None else deadline - time.monotonic()
        if left is None or left <= 0:
            return None
        first = queues[0]
        wait = min(left, BACKFILL_POLL_S)
        job_id = _move(worker, connection.blmove, first.key, first.intermediate_queue_key, wait)
        if job_id is not None:
            return first.key, as_text(job_id)


def _move(worker: LeadscoreWorker | None, move, *args) -> bytes | None:
    """One (B)LMOVE, during which `worker`'s warm stop is held; still held after it took a job."""
    if worker is None:
        return move(*args)
    worker.holding_warm_stop = True
    try:
        job_id = move(*args)
    except BaseException:
        _release_warm_stop(worker)
        raise
    if job_id is None:
        _release_warm_stop(worker)
    return job_id


def _release_warm_stop(worker: LeadscoreWorker | None) -> None:
    if worker is not None:
        worker.release_warm_stop()


class LeadscoreWorker(Worker):
    """An RQ worker that loses no job it took to a SIGKILL (above), and whose maintenance also finds
    pending leads whose collector was lost."""

    queue_class = LeadscoreQueue
    log_result_lifespan = False  # "result is kept for 500 seconds", a line every job
    holding_warm_stop = False  # from taking a job off a queue until it is filed as running
    _stop_held = False

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        token = _taker.set(self)  # the queue class's dequeue holds this worker's warm stop
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            _taker.reset(token)

    def _shutdown(self) -> None:
        """RQ's warm stop: after the running job, or at once (StopRequested) when idle."""
        if self.holding_warm_stop:
            self._stop_held = True
        else:
            super()._shutdown()

    def release_warm_stop(self) -> None:
        """A warm stop held meanwhile takes effect: after the job, if one was filed, else at once."""
        self.holding_warm_stop = False
        if self._stop_held:
            self._stop_held = False
            super()._shutdown()

    def setup_work_horse_signals(self) -> None:
        """The work horse ignores SIGTERM as RQ has it ignore SIGINT. A platform stopping the worker
        signals every process of it (Heroku's dyno; systemd's control group), and RQ's horse died
        of it mid-job, a retry spent: the worker's warm stop waits for the job, and a cold stop
        still takes the horse down (SIGKILL)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def request_force_stop(self, signum, frame) -> None:
        """A second Ctrl+C is a cold stop, as in RQ; a second SIGTERM is not: platforms send it
        again (Heroku may), and they SIGKILL when their patience ends, which loses no job (above)."""
        if signum == signal.SIGTERM:
            self.log.info("Worker %s: SIGTERM again; still finishing the job in hand", self.name)
            return
        super().request_force_stop(signum, frame)

    def prepare_execution(self, job: Job) -> Execution:
        """File the job as running, mark it started and take it off the intermediate list (with the
        time maintenance first saw it there) in one transaction, before the fork (RQ's
        `prepare_execution`, and the work horse's marking)."""
        try:
            with self.connection.pipeline() as pipeline:
                ttl = self.get_heartbeat_ttl(job)
                execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=self.name)
                self.executions[execution.id] = execution
                self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
                job.prepare_for_execution(self.name, pipeline=pipeline)
                parked = Queue(job.origin, connection=self.connection).intermediate_queue
                pipeline.lrem(parked.key, 1, job.id)
                pipeline.delete(parked.get_first_seen_key(job.id))  # else a retry could look stuck at once
                pipeline.execute()
        finally:
            self.release_warm_stop()
        return execution

    def clean_registries(self) -> None:
        super().clean_registries()
        for queue in self.queues:
            if not queue.name.endswith(pending.BACKFILL):  # the backfill's accounts are the live queue's
                sweep(queue)


def build(queues: list[Queue], connection, maintenance_s: int) -> LeadscoreWorker:
    return LeadscoreWorker(
        [LeadscoreQueue(queue.name, connection=connection) for queue in queues],
        connection=connection,
        maintenance_interval=maintenance_s,
        job_monitoring_interval=JOB_MONITORING_S,
        worker_ttl=max(35, maintenance_s + 20),  # an idle worker wakes up in time for maintenance
    )
