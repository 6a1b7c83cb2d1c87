"""What one cictl invocation shares: its output, and the API client (made on first use, so
`cictl --help` and `cictl version` need no configuration)."""

from cictl import config as configuration
from cictl.client import Api
from cictl.errors import Refused
from cictl.output import Output


class Session:
    def __init__(self, *, verbose: bool = False):
        self.out = Output(verbose=verbose)
        self._api: Api | None = None
        self._pipeline_names: dict[int, str] = {}

    def config(self) -> configuration.Config:
        loaded = configuration.load()
        self.out.hide(loaded.token)
        return loaded

    @property
    def api(self) -> Api:
        if self._api is None:
            loaded = self.config()
            for warning in loaded.warnings:
                self.out.warn(warning)
            self.out.debug(
                f"server {configuration.display_url(loaded.url)} (from {loaded.sources['url']}),"
                f" token from {loaded.sources['token']}"
            )
            self._api = Api(loaded, self.out)
        return self._api

    def pipeline_name(self, pipeline_id: int) -> str:
        """A build shows its pipeline's id: its name, where the token may read it."""
        if pipeline_id not in self._pipeline_names:
            try:
                name = self.api.get(f"/api/pipelines/{pipeline_id}/")["name"]
            except Refused as exc:  # no view_pipeline: its id will do
                self.out.debug(f"pipeline {pipeline_id}'s name: {exc.code}")
                name = f"pipeline {pipeline_id}"
            self._pipeline_names[pipeline_id] = name
        return self._pipeline_names[pipeline_id]

    def remember_pipeline(self, pipeline: dict) -> None:
        self._pipeline_names[pipeline["id"]] = pipeline["name"]

    def close(self) -> None:
        if self._api is not None:
            self._api.close()


_current: Session | None = None


def start(*, verbose: bool) -> Session:
    """The invocation's session (the root command makes it, before any command runs)."""
    global _current
    _current = Session(verbose=verbose)
    return _current


def current() -> Session:
    assert _current is not None, "the root command starts the session"
    return _current
