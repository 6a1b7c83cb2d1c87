"""Start-up checks of settings whose values depend on each other (Django's system checks:
every manage.py command runs them, `runagent` and `migrate` included)."""

from django.conf import settings
from django.core.checks import Error, register

FENCE_MARGIN_SECONDS = 1  # the fence watchdog's tick and a heartbeat's way to the database


@register()
def fencing_beats_the_lost_agent_timeout(app_configs, **kwargs):
    """A cut-off agent's steps must be dead before the server may give their slot away."""
    fence, grace = settings.AGENT_FENCE_SECONDS, settings.STEP_KILL_GRACE_SECONDS
    offline = settings.AGENT_OFFLINE_AFTER_SECONDS
    if fence > 0 and fence + grace + FENCE_MARGIN_SECONDS <= offline:
        return []
    return [
        Error(
            f"AGENT_FENCE_SECONDS ({fence:g}) + STEP_KILL_GRACE_SECONDS ({grace:g}) +"
            f" {FENCE_MARGIN_SECONDS} must be at most AGENT_OFFLINE_AFTER_SECONDS ({offline:g}),"
            " and the fence time above 0: else the server may start another build in the slot"
            " of a cut-off agent's steps while they still run",
            hint="lower AGENT_FENCE_SECONDS or STEP_KILL_GRACE_SECONDS, or raise"
            " AGENT_OFFLINE_AFTER_SECONDS",
            id="ciproject.E001",
        )
    ]
