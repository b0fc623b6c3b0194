"""What a control actor was started with, for the next `vela serve` to compare
(:func:`vela.launch.started_with`): each setting it uses as a salted digest, never
its value. Light on purpose: the Scheduler's class travels to every worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vela.config import Settings


class StartedWith:
    """Mixed into each control actor (and the API's), which keeps its ``_settings``."""

    _settings: Settings

    def started_with(self, salt: str) -> dict[str, str]:
        from vela.launch import started_with

        return started_with(self._settings, salt)
