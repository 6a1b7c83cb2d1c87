"""A build's jobs grouped into its stages, each with the status its jobs give it: what the API's
build document and the admin's build page both show."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from builds.models import JobRun
from builds.statuses import stage_status


@dataclass
class Stage:
    index: int
    name: str
    status: str = ""
    jobs: list[JobRun] = field(default_factory=list)


def group_stages(jobs: Iterable[JobRun]) -> list[Stage]:
    """The stages of `jobs` in their order, each with its jobs in the order given and its
    status (builds.statuses.stage_status); a stage's name is its first job's."""
    stages: dict[int, Stage] = {}
    for job in jobs:
        stage = stages.setdefault(job.stage_index, Stage(job.stage_index, job.stage_name))
        stage.jobs.append(job)
    for stage in stages.values():
        stage.status = stage_status([job.status for job in stage.jobs])
    return [stages[index] for index in sorted(stages)]
