"""The agent's state folder: created private to the agent's user, or a clear reason why not.

The journal keeps every prompt, the images are the users' pictures and the credentials folder
holds the API token: nothing in it is for other users of the machine. Files are created 0600
and folders 0700 (the process's umask, which the worker inherits).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agent.settings import SettingsError

if TYPE_CHECKING:
    from agent.settings import Settings

PRIVATE_UMASK = 0o077
PRIVATE_FOLDER = 0o700


def prepare_state_folders(settings: Settings) -> None:
    """Make the state and image folders, private; tighten the state folder if it was open.

    An ``image_dir`` the operator chose elsewhere keeps the mode it has (another service may
    read it); one the agent creates is private like the rest.

    Raises:
        SettingsError: A folder cannot be created or written; the message names it and why.
    """
    os.umask(PRIVATE_UMASK)
    for name, folder in (("state_dir", settings.state_dir), ("image_dir", settings.images_path)):
        try:
            folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
            if folder == settings.state_dir:
                folder.chmod(PRIVATE_FOLDER)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SettingsError(f"{name} {folder} cannot be used: {reason}") from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SettingsError(f"{name} {folder} cannot be used: it is not writable")
