"""The ``edgeai-agent`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from agent import __version__
from agent.home_assistant_app import prepare_app_environment
from agent.logs import configure_logging
from agent.machine.memory import return_large_allocations
from agent.settings import SettingsError, describe_settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; its help lists every setting."""
    parser = argparse.ArgumentParser(
        prog="edgeai-agent",
        description="Generate images with SDXL-Turbo for MQTT clients on the network.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (environment variable [default]); the same names in lower case "
        "can be set in the TOML file:\n" + describe_settings(),
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (EDGEAI_CONFIG_FILE)")
    parser.add_argument(
        "--check", action="store_true", help="validate the settings, print them and exit"
    )
    parser.add_argument(
        "--page-url",
        action="store_true",
        help="print the web page's address with the API token (generated if there is none yet) "
        "and exit",
    )
    parser.add_argument(
        "--journal-backup",
        action="store_true",
        help="write a consistent copy of the job journal beside it (journal-backup.sqlite3), "
        "which backups hold instead of the live journal, and exit (the Home Assistant app's "
        "backup_pre)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at debug level (EDGEAI_LOG_LEVEL=DEBUG), the worker included",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the agent in the foreground; return the exit code."""
    arguments = build_parser().parse_args(argv)
    try:
        as_app = prepare_app_environment(os.environ, ask_for_broker=not arguments.journal_backup)
        settings = load_settings(arguments.config)
        settings.password()  # a missing password file should stop the start, not the connect
    except SettingsError as exc:
        print(f"edgeai-agent: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own error
        return 2
    if arguments.check:
        print(settings.model_dump_json(indent=2))  # noqa: T201 - requested output
        return 0
    if arguments.journal_backup:
        return _write_journal_backup(settings.journal_path)
    if arguments.page_url:
        from agent.web.auth import agent_token  # noqa: PLC0415 - keeps --help fast

        try:
            token = agent_token(settings)
        except SettingsError as exc:
            print(f"edgeai-agent: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own error
            return 2
        address = settings.base_url(settings.http_port) + "/"
        print(address + (f"?token={token}" if token else ""))  # noqa: T201 - requested output
        return 0
    if arguments.verbose:
        settings = settings.model_copy(update={"log_level": "DEBUG"})
    configure_logging(settings.log_level)
    if as_app is not None:
        logging.getLogger("agent.home_assistant_app").info("%s", as_app.line)
    from agent.app import Agent  # noqa: PLC0415 - keeps --help fast

    # The daemon's large buffers (a picture being decoded) go back to the system once freed.
    return_large_allocations()
    supervisor = as_app.supervisor if as_app is not None else None
    return asyncio.run(Agent(settings, supervisor=supervisor).run())


def _write_journal_backup(journal: Path) -> int:
    """Write the journal's copy for a backup; print what was written; 1 when it failed."""
    import sqlite3  # noqa: PLC0415 - keeps --help fast

    from agent.jobs.journal_backup import backup_path, write_journal_backup  # noqa: PLC0415
    from agent.machine.state_folder import PRIVATE_UMASK  # noqa: PLC0415

    os.umask(PRIVATE_UMASK)  # the copy holds every prompt, as the journal does
    try:
        jobs = write_journal_backup(journal)
    except (OSError, sqlite3.Error) as exc:
        print(f"edgeai-agent: cannot copy the journal {journal}: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's own error
        return 1
    if jobs is None:
        print(f"no journal at {journal} yet: nothing to copy")  # noqa: T201 - requested output
    else:
        print(f"journal copied to {backup_path(journal)}: {jobs} jobs")  # noqa: T201 - requested output
    return 0
