from ciproject.errors import CIError


class PolicyNotAllowed(CIError):
    code = "POLICY_NOT_ALLOWED"  # the definition names a policy its editor may not attach
    http_status = 403


class TeamNotAllowed(CIError):
    code = "TEAM_NOT_ALLOWED"  # a pipeline given to a team its editor does not maintain
    http_status = 403
