"""cictl: ciproject's command-line client for developers' machines (the REST API only)."""

__version__ = "0.1.0"
