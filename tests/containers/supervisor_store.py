"""Read this repository as Home Assistant's Supervisor reads an app repository; exit 1 on any
warning or error it logs.

Run by scripts/check-app with the Supervisor's own source on the path (it needs Python 3.13 or
later and the Supervisor's requirements). The steps are the Supervisor's: the repository file
(store/data.py ``_read_git_repository``), every ``config.*`` the store's glob finds
(``_find_app_configs``) validated with the schema that logs every advisory
(``SCHEMA_APP_CONFIG``), the translations (``_read_app_translations``), the build file the
Supervisor would warn about (apps/build.py), the Dockerfile it would build, and the default
options against the app's own schema (apps/options.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from supervisor.apps.build import AppBuild
from supervisor.apps.options import AppOptions
from supervisor.apps.validate import SCHEMA_APP_CONFIG
from supervisor.const import ATTR_OPTIONS, ATTR_SCHEMA, FILE_SUFFIX_CONFIGURATION
from supervisor.store.data import _read_app_translations, _read_git_repository
from supervisor.utils.common import read_json_or_yaml_file


class Recorder(logging.Handler):
    """Keeps every warning and error the Supervisor's code logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class StoreApp:
    """What AppBuild reads of an app: where its files are."""

    def __init__(self, path: Path, slug: str) -> None:
        self.path_location = path
        self.slug = slug


def main(repository: Path) -> int:
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    logging.getLogger().setLevel(logging.DEBUG)
    found = _read_git_repository(repository)
    print(f"repository: {found.config if found else None}")
    configs = [
        path
        for path in repository.glob("**/config.*")
        if not [part for part in path.parts if part.startswith(".") or part == "rootfs"]
        and path.suffix in FILE_SUFFIX_CONFIGURATION
    ]
    print(f"app configs the store finds: {[str(path.relative_to(repository)) for path in configs]}")
    for path in configs:
        app = SCHEMA_APP_CONFIG(read_json_or_yaml_file(path))
        print(f"{path.name}: {app['name']} {app['version']} ({app['slug']}) valid")
        translations = _read_app_translations(path.parent)
        print(f"translations: {sorted(translations)}")
        data = AppBuild._read_build_config(StoreApp(path.parent, app["slug"]))
        if data is not None:
            logging.getLogger("supervisor.apps.build").warning(
                "App %s uses build.yaml which is deprecated.", app["slug"]
            )
        dockerfile = path.parent / "Dockerfile"
        print(f"Dockerfile: {dockerfile.exists()}")
        if not dockerfile.exists():
            logging.getLogger("supervisor.apps.build").error("no Dockerfile")
        options = AppOptions(None, app[ATTR_SCHEMA], app["name"], app["slug"])
        print(f"default options valid: {options(app[ATTR_OPTIONS])}")
    for record in recorder.records:
        print(f"{record.levelname} {record.name}: {record.getMessage()}")
    print(f"{len(recorder.records)} warnings or errors")
    return 1 if recorder.records or not configs or found is None else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
