import re
import socket

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from agents.process.agent import AgentProcess
from agents.process.step_user import StepUser, StepUserError
from builds.definition import LABEL_PATTERN
from ciproject.services_check import require_services

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class Command(BaseCommand):
    help = "Run this machine as a build agent: a Celery worker for the given labels."

    def add_arguments(self, parser):
        parser.add_argument("--name", default=socket.gethostname().split(".")[0])
        parser.add_argument(
            "--labels", default="default", help="comma separated, e.g. linux,default"
        )
        parser.add_argument("--capacity", type=int, default=1, help="jobs run at once")
        parser.add_argument(
            "--step-user",
            default=settings.AGENT_STEP_USER,
            help="run steps as this user (the agent needs root or CAP_SETUID and CAP_SETGID);"
            " default AGENT_STEP_USER",
        )
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, name, labels, capacity, loglevel, step_user, **options):
        if not NAME_RE.fullmatch(name):
            raise CommandError(f"--name {name!r}: letters, digits, '.', '_' or '-'")
        label_list = [label.strip() for label in labels.split(",") if label.strip()]
        bad = [label for label in label_list if not re.fullmatch(LABEL_PATTERN, label)]
        if not label_list or bad:
            raise CommandError(f"--labels: invalid label(s) {bad or labels!r}")
        if not 1 <= capacity <= 64:
            raise CommandError("--capacity: from 1 to 64")
        try:
            user = StepUser(step_user) if step_user else None
        except StepUserError as exc:
            raise CommandError(str(exc)) from None
        require_services()
        AgentProcess(name, label_list, capacity, user).run(loglevel)
