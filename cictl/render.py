"""A build as a tree of stages, jobs and steps, with statuses, attempts, durations and
reasons: plain lines (indented two spaces a level) where stdout is not a terminal, a rich
tree with colours where it is."""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.spinner import Spinner
from rich.text import Text
from rich.tree import Tree

BUILD_FINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "QUEUE_TIMEOUT"})
RUN_FINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "SKIPPED"})
NOT_STARTED = frozenset({"PENDING", "QUEUED"})

STYLES = {
    "SUCCEEDED": "bold green",
    "FAILED": "bold red",
    "TIMED_OUT": "bold red",
    "QUEUE_TIMEOUT": "bold red",
    "RUNNING": "bold yellow",
    "CANCELLING": "magenta",
    "CANCELED": "magenta",
    "QUEUED": "cyan",
    "PENDING": "dim",
    "SKIPPED": "dim",
}


@dataclass
class Node:
    kind: str  # build, stage, job, step
    name: str
    status: str
    fields: list[str] = field(default_factory=list)
    reason: str = ""
    children: list["Node"] = field(default_factory=list)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def duration(item: dict, now: datetime | None = None) -> str:
    """How long it ran: to its end, or so far. Empty if it has not started."""
    started = parse_time(item.get("started_at"))
    if started is None:
        return ""
    ended = parse_time(item.get("finished_at")) or now or datetime.now(UTC)
    return format_seconds(max((ended - started).total_seconds(), 0.0))


def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


def attempt(run: dict) -> str:
    """`attempt N` of a job or step that has run (one skipped or waiting has none yet)."""
    ran = run.get("started_at") or run["status"] not in NOT_STARTED | {"SKIPPED"}
    return f"attempt {run['attempt']}" if ran else ""


def one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def heading(build: dict, pipeline: str) -> str:
    """`build 12  hello #4  RUNNING` (and `attempt 2` past the first): what a trigger and a
    retry print."""
    attempt = build.get("attempt", 1)
    text = f"build {build['id']}  {pipeline} #{build['number']}  {build['status']}"
    return f"{text}  attempt {attempt}" if attempt > 1 else text


def tree(build: dict, pipeline: str, now: datetime | None = None) -> Node:
    root = Node(
        "build",
        f"{build['id']}  {pipeline} #{build['number']}",
        build["status"],
        [f"attempt {build.get('attempt', 1)}", duration(build, now)],
        one_line(build.get("reason")),
    )
    for stage in build.get("stages", []):
        stage_node = Node("stage", stage["name"], stage["status"])
        root.children.append(stage_node)
        for job in stage["jobs"]:
            job_fields = [attempt(job)]
            if job.get("agent"):
                job_fields.append(f"on {job['agent']}")
            job_fields.append(duration(job, now))
            job_node = Node("job", job["key"], job["status"], job_fields, one_line(job["reason"]))
            stage_node.children.append(job_node)
            for step in job["steps"]:
                step_fields = [] if step["exit_code"] is None else [f"exit {step['exit_code']}"]
                step_fields += [attempt(step), duration(step, now)]
                job_node.children.append(
                    Node(
                        "step", step["name"], step["status"], step_fields, one_line(step["reason"])
                    )
                )
    return root


def plain_lines(node: Node, depth: int = 0) -> list[str]:
    parts = [f"{node.kind} {node.name}", node.status, *filter(None, node.fields)]
    if node.reason:
        parts.append(f"reason: {node.reason}")
    lines = ["  " * depth + "  ".join(parts)]
    for child in node.children:
        lines += plain_lines(child, depth + 1)
    return lines


def label(node: Node) -> Text:
    text = Text()
    text.append(node.kind, style="dim")
    text.append(f" {node.name}  ", style="bold" if node.kind in ("build", "job") else "")
    text.append(node.status, style=STYLES.get(node.status, ""))
    for value in filter(None, node.fields):
        text.append(f"  {value}", style="dim")
    if node.reason:
        text.append(f"  {node.reason}", style="italic")
    return text


def size(node: Node) -> int:
    """Its lines, as a tree."""
    return 1 + sum(size(child) for child in node.children)


def rich_tree(
    node: Node, *, spinning: bool = False, note: str = "", height: int | None = None
) -> RenderableType:
    """The tree for a terminal; `spinning` while it still runs, `note` under it (an outage
    while waiting). Taller than `height`, only the steps of running and failed jobs show."""
    top: RenderableType = label(node)
    if spinning:
        top = Spinner("dots", text=top, style="yellow")
    root = Tree(top, guide_style="dim")
    _grow(root, node.children, collapse=height is not None and size(node) + 1 > height)
    return Group(root, Text(note, style="yellow")) if note else root


SHOWN_WHEN_COLLAPSED = frozenset({"RUNNING", "FAILED", "TIMED_OUT"})


def _grow(branch: Tree, children: list[Node], collapse: bool) -> None:
    for child in children:
        top: RenderableType = label(child)
        if child.status == "RUNNING":
            top = Spinner("dots", text=top, style="yellow")
        grown = branch.add(top)
        if not (collapse and child.kind == "job" and child.status not in SHOWN_WHEN_COLLAPSED):
            _grow(grown, child.children, collapse)
