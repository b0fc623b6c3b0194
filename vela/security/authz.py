"""What a build-token request may do: the one place that decides it."""

from __future__ import annotations

from enum import StrEnum

from vela.domain import BuildStatus
from vela.security.errors import Reason, Rejected
from vela.security.keys import same
from vela.security.tokens import BuildClaims


class BuildAction(StrEnum):
    START = "build.start"
    FINISH = "build.finish"
    STEP_UPDATE = "step.update"
    LOG_APPEND = "log.append"


BUILD_TOKEN_ACTIONS = frozenset(BuildAction)


def authorize_build_request(claims: BuildClaims, action: str, *, build_id: int,
                            build_status: BuildStatus | str, build_worker: str | None,
                            build_token_jti: str | None) -> None:
    """Allow a verified build token to perform ``action`` on build ``build_id``.

    ``build_*`` are the build's current row: its status, the worker it was
    dispatched to and the jti of the one token it currently accepts. So a
    token dies the moment its build ends or is dispatched again. Anything a
    build token is not for (secrets, other builds, admin actions) is
    ``forbidden_action``.
    """
    if action not in BUILD_TOKEN_ACTIONS:
        raise Rejected(Reason.FORBIDDEN_ACTION, f"a build token cannot {str(action)[:40]!r}")
    if claims.build_id != build_id:
        raise Rejected(Reason.WRONG_BUILD, f"token is for build {claims.build_id}")
    status = BuildStatus(build_status)
    if status.terminal:
        raise Rejected(Reason.BUILD_ENDED, f"build {build_id} is {status}")
    if status is not BuildStatus.RUNNING:
        raise Rejected(Reason.TOKEN_REVOKED, f"build {build_id} is {status}")
    if build_worker is None or build_worker != claims.wkr:
        raise Rejected(Reason.WRONG_WORKER, f"build {build_id} runs elsewhere")
    if build_token_jti is None or not same(build_token_jti, claims.jti):
        raise Rejected(Reason.TOKEN_REVOKED, f"build {build_id} has a newer token")
