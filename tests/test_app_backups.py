"""Backups of the Home Assistant app, made the way the Supervisor makes them.

The Supervisor backs up an app's /data with securetar's ``atomic_contents_add`` and a filter that
matches each of config.yaml's ``backup_exclude`` patterns against the file's full path
(``supervisor/apps/app.py``, ``App._is_excluded_by_filter``); a running app is backed up hot,
after its ``backup_pre`` command ran inside it (``docker exec``). Here the agent lays out its
state as the app does (the model from the Hugging Face cache under /data/huggingface, integer
weights in /data/weights) and the backup is written with the same walk and the same rule.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from functools import partial
from pathlib import Path, PurePath

import pytest
import yaml
from securetar import atomic_contents_add

from agent.jobs.journal_backup import backup_path, restore_journal_backup
from tests.conftest import ROOT, generate

EXCLUDES = yaml.safe_load((ROOT / "config.yaml").read_text())["backup_exclude"]
BACKUP_PRE = yaml.safe_load((ROOT / "config.yaml").read_text())["backup_pre"]
HUB_REVISION = "0" * 40


def supervisor_backup(data: Path, archive: Path, excludes: list[str]) -> None:
    """Write ``data`` to ``archive`` as the Supervisor writes an app's data folder."""

    def excluded(origin_path: Path, arcname: str, item_arcpath: PurePath) -> bool:
        # supervisor/apps/app.py, App._is_excluded_by_filter, as it is.
        full_path = origin_path / item_arcpath.relative_to(arcname)
        return any(full_path.match(exclude) for exclude in excludes)

    with tarfile.open(archive, "w:gz") as tar:
        atomic_contents_add(tar, data, file_filter=partial(excluded, data, "data"), arcname="data")


def restore(archive: Path, into: Path) -> Path:
    """Unpack a backup as the Supervisor restores it: the data folder replaced by its copy."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "data"


def hub_cache(hf_home: Path, repo: str, files: Path, *, variant: str | None = None) -> None:
    """Put a model in the Hugging Face cache's layout, as a download from the hub leaves it
    (with ``variant``, its weight files named as SDXL-Turbo's fp16 files are)."""
    owner, name = repo.split("/")
    folder = hf_home / "hub" / f"models--{owner}--{name}"
    snapshot = folder / "snapshots" / HUB_REVISION
    shutil.copytree(files, snapshot, ignore=shutil.ignore_patterns("taesd"))
    if variant is not None:
        for weights in snapshot.glob("*/*.safetensors"):
            weights.rename(weights.with_suffix(f".{variant}.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(HUB_REVISION)


def app_agent(make_agent, broker, tiny_model, data: Path, **env):
    """An agent whose state is an app's /data: the model downloaded into its cache there."""
    hf_home = data / "huggingface"
    if not hf_home.exists():
        hub_cache(hf_home, "edgeai/tiny-sdxl", tiny_model, variant="fp16")
        hub_cache(hf_home, "edgeai/tiny-taesd", tiny_model / "taesd")
    agent = make_agent(
        broker,
        start=False,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        EDGEAI_MODEL="edgeai/tiny-sdxl",
        EDGEAI_TINY_VAE="edgeai/tiny-taesd",
        **env,
    )
    agent.state_dir = data
    data.mkdir(exist_ok=True)
    (data / "options.json").write_text(json.dumps({"model": "edgeai/tiny-sdxl"}))
    agent.start()
    return agent


def members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_a_backup_holds_the_journal_token_options_and_pictures_but_not_the_model(
    make_agent, broker, tiny_model, tmp_path
):
    data = tmp_path / "data"
    agent = app_agent(
        make_agent, broker, tiny_model, data, EDGEAI_HTTP_AUTH="true", EDGEAI_WEIGHT_FORM="int8"
    )
    client = broker.client()
    try:
        assert generate(client, agent, id="kept-1")["status"] == "ok"
    finally:
        client.close()
    assert agent.stop() == 0  # a stopped app: backed up without its backup_pre
    assert any((data / "weights").iterdir()), "the int8 forms were written"

    full, trimmed = tmp_path / "everything.tar.gz", tmp_path / "backup.tar.gz"
    supervisor_backup(data, full, [])
    supervisor_backup(data, trimmed, EXCLUDES)
    names = members(trimmed)
    print(
        f"backup of a stopped app: {full.stat().st_size:,} bytes with everything, "
        f"{trimmed.stat().st_size:,} with backup_exclude ({len(members(full))} and "
        f"{len(names)} entries)"
    )
    for kept in ("data/journal-backup.sqlite3", "data/api-token", "data/options.json"):
        assert kept in names
    assert any(name.startswith("data/images/") and name.endswith(".png") for name in names)
    for left_out in ("data/huggingface", "data/weights", "data/journal.sqlite3"):
        assert not [name for name in names if name.startswith(left_out)], left_out
    assert any(name.startswith("data/huggingface/") for name in members(full))

    # The restored app starts from the copy; its first start downloads the model again (here:
    # the cache put back, as the download would).
    restored = restore(trimmed, tmp_path / "restored")
    hub_cache(restored / "huggingface", "edgeai/tiny-sdxl", tiny_model, variant="fp16")
    hub_cache(restored / "huggingface", "edgeai/tiny-taesd", tiny_model / "taesd")
    again = app_agent(make_agent, broker, tiny_model, restored, EDGEAI_HTTP_AUTH="true")
    log = again.log_path.read_text()
    assert "journal: started from the backup's copy, 1 jobs" in log
    with sqlite3.connect(restored / "journal.sqlite3") as journal:
        assert journal.execute("SELECT id FROM jobs").fetchall() == [("kept-1",)]
    token = (data / "api-token").read_text()
    assert (restored / "api-token").read_text() == token  # the integration's token still works


def test_a_hot_backup_holds_every_job_acknowledged_before_it(
    make_agent, broker, tiny_model, tmp_path
):
    """Jobs keep arriving while the backup's command runs and /data is copied: the copy opens,
    passes SQLite's integrity check and holds every job the agent acknowledged before."""
    data = tmp_path / "data"
    agent = app_agent(make_agent, broker, tiny_model, data)
    client = broker.client()
    client.subscribe(f"{agent.base}/jobs/+")
    stop = threading.Event()

    def publish_jobs() -> None:
        # As fast as the tiny model answers (a full queue would refuse, not take, the rest).
        while not stop.wait(0.05):
            job = {"id": uuid.uuid4().hex[:12], "prompt": "a red apple", "steps": 1}
            client.publish(f"{agent.base}/generate", json.dumps(job))

    def acknowledged() -> set[str]:
        """Jobs the agent told the client it has taken (journaled first, then told)."""
        return {message.json()["id"] for message in client.messages_matching(f"{agent.base}/jobs/")}

    publisher = threading.Thread(target=publish_jobs)
    publisher.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged()) < 20:
            assert time.monotonic() < deadline, "jobs were not taken"
            time.sleep(0.1)
        before = acknowledged()
        # backup_pre, run inside the app as the Supervisor runs it, while jobs arrive.
        command = BACKUP_PRE.split()
        assert command[0] == "edgeai-agent"
        pre = subprocess.run(
            [sys.executable, "-m", "agent", *command[1:]],
            env=agent.env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert pre.returncode == 0, pre.stderr
        assert "journal copied to" in pre.stdout
        archive = tmp_path / "backup.tar.gz"
        supervisor_backup(data, archive, EXCLUDES)
        during = acknowledged() - before
    finally:
        stop.set()
        publisher.join()
        client.close()
    assert during, "no job arrived while the backup was made: the test proves nothing"
    restored = restore(archive, tmp_path / "restored")
    assert not (restored / "journal.sqlite3").exists()
    with sqlite3.connect(restored / "journal-backup.sqlite3") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        held = {row[0] for row in copy.execute("SELECT id FROM jobs")}
    missing = before - held
    assert not missing, f"{len(missing)} acknowledged jobs not in the backup"
    print(f"hot backup: {len(before)} jobs before it, all held; {len(during)} arrived during it")
    assert agent.stop() == 0


def test_a_damaged_copy_is_named_in_the_log_and_the_agent_starts_empty(
    make_agent, broker, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal-backup.sqlite3").write_bytes(b"not a database" * 100)
    agent = make_agent(broker, start=False)
    agent.state_dir = data
    agent.start()
    log = agent.log_path.read_text()
    assert "journal: cannot start from the backup's copy" in log
    assert "Traceback" not in log
    client = broker.client()
    try:
        assert generate(client, agent, id="after-damage")["status"] == "ok"
    finally:
        client.close()


def test_a_copy_cut_short_is_refused_whole(tmp_path):
    """A copy that lost its end (a backup cut off) is not half-restored: nothing is written."""
    journal = tmp_path / "journal.sqlite3"
    copy = backup_path(journal)
    with sqlite3.connect(copy) as database:
        database.execute("CREATE TABLE jobs (id TEXT)")
        rows = [(str(index) * 500,) for index in range(99)]
        database.executemany("INSERT INTO jobs VALUES (?)", rows)
    copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
    with pytest.raises(sqlite3.DatabaseError):
        restore_journal_backup(journal)
    assert not journal.exists()
