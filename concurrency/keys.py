"""Group keys: `${name}` templates rendered from the pipeline and the build's variables."""

import re

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_KEY = 400
# What the server puts in a key: never a build variable's to set (builds.definition reserves
# these names), so no trigger can choose another pipeline's group.
SERVER_NAMES = ("pipeline_id", "pipeline_name")


def validate_template(template: str) -> None:
    if not template or not template.strip():
        raise ValueError("the group key may not be empty")
    leftover = PLACEHOLDER.sub("", template)
    if "${" in leftover:
        raise ValueError("use ${NAME} placeholders, NAME made of letters, digits and _")


def render(template: str, pipeline, variables: dict[str, str]) -> str:
    """Render a group key. An unknown placeholder renders empty, so `deploy-${BRANCH}` without
    BRANCH is `deploy-` (one group for all builds that do not say)."""
    server = dict(zip(SERVER_NAMES, (str(pipeline.pk), pipeline.name), strict=True))
    values = {**variables, **server}  # the server's values win, whatever a variable says
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), template)[:MAX_KEY]
