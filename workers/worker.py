"""The RQ worker `leadscore worker` runs (the Procfile's `worker:` line).

A worker may be SIGKILLed at any instant (an OOM kill, a lost host, a deploy). RQ finds a job its
dead worker was running and retries it, but two instants lost the job without a trace; both are
closed here, so a job is always in a queue, in its queue's intermediate list, or filed as running:
- between taking a job off one of several queues and filing it as running: RQ parks a taken job
  in its queue's intermediate list, where maintenance finds it, only for a worker of one queue,
  and ours take from two (live, then backfill);
- between filing it as running and its work horse marking it started: RQ's abandoned-job cleanup
  retries only jobs marked started (rq/rq#2466), and the work horse marks it after the fork.
"""

from __future__ import annotations

import time

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


def _take(queues: list[Queue], deadline: float | None, connection: Redis) -> tuple[str, str] | None:
    """(queue key, job id) of the first job of the first queue that has one, moved to that queue's
    intermediate list; waits until `deadline` (None: not at all), blocked on the first queue."""
    while True:
        for queue in queues:
            job_id = connection.lmove(queue.key, queue.intermediate_queue_key)
            if job_id is not None:
                return queue.key, as_text(job_id)
        left = None if deadline is None else deadline - time.monotonic()
        if left is None or left <= 0:
            return None
        first = queues[0]
        job_id = connection.blmove(first.key, first.intermediate_queue_key, min(left, BACKFILL_POLL_S))
        if job_id is not None:
            return first.key, as_text(job_id)


class LeadscoreWorker(Worker):
    """An RQ worker that loses no job it took to a SIGKILL (above), and whose maintenance also finds
    pending leads whose collector was lost."""

    queue_class = LeadscoreQueue

    def prepare_execution(self, job: Job) -> Execution:
        """File the job as running, mark it started and take it off the intermediate list (with the
        time maintenance first saw it there) in one transaction, before the fork (RQ's
        `prepare_execution`, and the work horse's marking)."""
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
