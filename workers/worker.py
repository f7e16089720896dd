"""The RQ worker `leadscore worker` runs (the Procfile's `worker:` line)."""

from __future__ import annotations

from rq import Worker

from integration import pending
from workers.batch import sweep

JOB_MONITORING_S = 5  # heartbeat: a killed worker's job is retried about a minute later


class LeadscoreWorker(Worker):
    """An RQ worker whose maintenance also finds pending leads whose collector was lost."""

    def clean_registries(self) -> None:
        super().clean_registries()
        for queue in self.queues:
            if not queue.name.endswith(pending.BACKFILL):  # the backfill's accounts are the live queue's
                sweep(queue)


def build(queues, connection, maintenance_s: int) -> LeadscoreWorker:
    return LeadscoreWorker(
        queues,
        connection=connection,
        maintenance_interval=maintenance_s,
        job_monitoring_interval=JOB_MONITORING_S,
        worker_ttl=max(35, maintenance_s + 20),  # an idle worker wakes up in time for maintenance
    )
