"""One load's files in an `offload_dir` that other loads may share.

Every load that writes to an offload folder names its files `llmslim-offload-<host>-<pid>-<token>*`,
so two models (in one process or several) never write, truncate or read each other's files. The
files go when the `OffloadFiles` that named them is garbage collected (it lives as long as the model
that reads them) or the interpreter exits; files of a process that no longer runs (killed while
loading or running) are removed by the next load into the folder.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import uuid
import weakref
from pathlib import Path

from llmslim.procs import process_running

logger = logging.getLogger(__name__)

PREFIX = "llmslim-offload-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{{12}})(\.|$)")


class OffloadFiles:
    """The paths one load owns in `folder`: `path(suffix)`; all removed with this object.

    Args:
        folder: the offload folder (created if missing). Files left there by dead processes of this
            host are removed first.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale(self.folder)
        self.stem = f"{PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._finalizer = weakref.finalize(self, _remove, self.folder, self.stem, os.getpid())

    def path(self, suffix: str) -> Path:
        """This load's file (or folder) `<stem><suffix>`."""
        return self.folder / f"{self.stem}{suffix}"

    def __deepcopy__(self, memo) -> OffloadFiles:
        return self  # a copied model reads the same files: they must outlive both


def remove_stale(folder: Path) -> None:
    """Remove offload files in `folder` written by processes of this host that no longer run."""
    host = socket.gethostname()
    for path in folder.glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match and match["host"] == host and not process_running(int(match["pid"])):
            logger.info("removing %s, left by process %s which no longer runs", path, match["pid"])
            _remove_path(path)


def _remove(folder: Path, stem: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked child exiting: the files are its parent's, still in use
        return
    for path in folder.glob(f"{glob.escape(stem)}*"):
        _remove_path(path)


def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError as err:  # cleanup must never break a load or interpreter exit
        logger.warning("could not remove offload file %s: %s", path, err)
