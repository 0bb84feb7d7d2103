"""The settings reference (``docs/settings.md``), written from the settings model itself.

Each setting's description is its documentation; this renders them as the page operators read,
so the page cannot drift from the code (a test compares the file with :func:`settings_reference`).
Regenerate it with ``python -m agent.settings.reference > docs/settings.md``.
"""

from __future__ import annotations

import html

from agent.settings import ENV_PREFIX, Settings, default_text

INTRODUCTION = """# Settings

From the environment (`EDGEAI_<NAME>`), or a TOML file of `name = value` lines given with
`--config FILE` or `EDGEAI_CONFIG_FILE` (the environment wins). `edgeai-agent --help` lists them
too; `edgeai-agent --check` validates and prints them. A wrong setting stops the start with a
message that names it. A list is written as JSON in the environment
(`EDGEAI_HTTP_FRAME_ANCESTORS='["http://homeassistant.local:8123"]'`) and as a TOML list in the
file.

This page is generated from the settings model (`agent/settings/`):
`python -m agent.settings.reference > docs/settings.md`.
"""


def settings_reference() -> str:
    """Return ``docs/settings.md``: the introduction and one table row per setting."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        meaning = html.escape(field.description or "", quote=False)
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default_text(name)}` | {meaning} |")
    return INTRODUCTION + "\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")  # noqa: T201 - the page, to standard output
