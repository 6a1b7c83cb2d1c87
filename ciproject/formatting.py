"""Small formatting helpers shared by the admin pages."""


def human_duration(delta) -> str:
    """1h 02m 05s, 3m 05s or 7s."""
    seconds = int(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02}m {seconds:02}s"
    return f"{minutes}m {seconds:02}s" if minutes else f"{seconds}s"
