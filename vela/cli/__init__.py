"""The ``vela`` command line: the front door."""

from __future__ import annotations

from vela.cli import _commands  # noqa: F401  (registers commands on ``app``)
from vela.cli._app import app


def main() -> None:
    app(prog_name="vela")


if __name__ == "__main__":  # pragma: no cover
    main()
