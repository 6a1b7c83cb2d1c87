"""Names to ids: a pipeline by its name (the API finds pipelines by id only, so cictl reads
the list, which comes sorted by name), a step by its name within a build."""

from dataclasses import dataclass

from cictl.client import Api
from cictl.errors import Refused

PAGE = 500  # the API's largest page


def pipeline(api: Api, ref: str) -> dict:
    """PIPELINE as cictl takes it: digits are an id, anything else a name (a pipeline whose
    name is all digits is reached by its id)."""
    if ref.isdecimal():
        return api.get(f"/api/pipelines/{int(ref)}/")
    names = []
    offset = 0
    while True:
        page = api.get("/api/pipelines/", params={"limit": PAGE, "offset": offset})
        results = page["results"] if isinstance(page, dict) else page
        for found in results:
            if found["name"] == ref:
                return found
            names.append(found["name"])
        offset += len(results)
        if not isinstance(page, dict) or not results or offset >= page.get("count", 0):
            break
    near = [name for name in names if name.lower() == ref.lower()]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise Refused("PIPELINE_NOT_FOUND", f"no pipeline is named {ref!r}{hint}")


@dataclass(frozen=True)
class StepRef:
    """A step of a build, where it is: its stage and job."""

    stage: str
    job: dict
    step: dict

    @property
    def id(self) -> int:
        return self.step["id"]

    @property
    def label(self) -> str:
        return f"{self.job['key']}/{self.step['name']}"


def steps(build: dict) -> list[StepRef]:
    """The build's steps in order: by stage, job, then step (the API's order)."""
    return [
        StepRef(stage["name"], job, step)
        for stage in build.get("stages", [])
        for job in stage["jobs"]
        for step in job["steps"]
    ]


def matching(build: dict, ref: str) -> list[StepRef]:
    """The steps REF names: `job/step`, else a step name (in any job), else a step id."""
    every = steps(build)
    for test in (
        lambda s: s.label == ref,
        lambda s: s.step["name"] == ref,
        lambda s: ref.isdecimal() and s.id == int(ref),
    ):
        found = [s for s in every if test(s)]
        if found:
            return found
    names = ", ".join(repr(s.label) for s in every) or "none"
    raise Refused("STEP_NOT_FOUND", f"build {build['id']} has no step {ref!r} (its steps: {names})")


def one_step(build: dict, ref: str) -> StepRef:
    found = matching(build, ref)
    if len(found) > 1:
        names = ", ".join(repr(s.label) for s in found)
        raise Refused(
            "STEP_AMBIGUOUS",
            f"{ref!r} names {len(found)} steps of build {build['id']}: {names}; name one"
            " as job/step, or by its id",
        )
    return found[0]
