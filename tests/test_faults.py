"""Writers killed (SIGKILL) at each step of a write: the old output is intact or put back, never partial, and the next run
cleans up and succeeds.

A "zygote" child imports llmslim once, then forks one process per run, so each run costs a fork, not an import. The forked
writer stops itself at the chosen point (the test patches tempfile / os / shutil in that process only; the library has no
test hooks) and the test SIGKILLs it there:

    tmp     the temporary folder was just created (empty)
    file    the model files are in the temporary folder, the tokenizer is not yet (partial)
    aside   the new folder is complete; the old OUT is about to be renamed aside
    swap    the old OUT is aside and the new one not yet renamed to OUT: OUT is missing for a moment
    remove  the new OUT is in place; the old one, renamed .del-, is partly deleted
    prune   (checkpoints) an old checkpoint being pruned is partly deleted
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from train.tiny import write_causal

from llmslim.save import clean_leftovers

pytestmark = pytest.mark.skipif(os.name != "posix", reason="forks writers and SIGKILLs them")

ZYGOTE = textwrap.dedent(
    r"""
    import json, os, shutil, signal, sys, tempfile, time
    from pathlib import Path

    import torch

    torch.set_num_threads(1)  # forking is safe before any parallel region ran; one thread keeps the shared CPU free

    import llmslim
    from llmslim.cli import main as cli_main
    from llmslim.finetune.merge import merge
    from llmslim.train import checkpoint
    from transformers import AutoTokenizer, PreTrainedTokenizerBase


    def stop(point):
        print("stopped", point, flush=True)
        time.sleep(3600)  # until the test kills this process


    def instrument(point):
        mkdtemp, replace, rmtree = tempfile.mkdtemp, os.replace, shutil.rmtree
        save_tokenizer, save_file = PreTrainedTokenizerBase.save_pretrained, checkpoint.save_file

        def patched_mkdtemp(*args, **kwargs):
            path = mkdtemp(*args, **kwargs)
            if point == "tmp" and ".tmp-" in kwargs.get("prefix", ""):
                stop(point)
            return path

        def patched_replace(src, dst):
            aside = ".old-" in os.fspath(dst)
            if point == "aside" and aside:
                stop(point)
            replace(src, dst)
            if point == "swap" and aside:
                stop(point)

        def patched_rmtree(path, *args, **kwargs):
            if point in ("remove", "prune") and ".del-" in os.fspath(path):
                next(p for p in sorted(Path(path).iterdir())).unlink()  # partly deleted
                stop(point)
            rmtree(path, *args, **kwargs)

        def patched_save_tokenizer(self, *args, **kwargs):
            if point == "file":
                stop(point)
            return save_tokenizer(self, *args, **kwargs)

        def patched_save_file(tensors, filename, *args, **kwargs):
            save_file(tensors, filename, *args, **kwargs)
            if point == "file":
                stop(point)

        tempfile.mkdtemp, os.replace, shutil.rmtree = patched_mkdtemp, patched_replace, patched_rmtree
        PreTrainedTokenizerBase.save_pretrained, checkpoint.save_file = patched_save_tokenizer, patched_save_file


    def run(cmd):
        if cmd["writer"] == "quantize":
            assert cli_main(["quantize", cmd["src"], cmd["out"], "--overwrite", "--weights", cmd["weights"]]) == 0
        elif cmd["writer"] == "save":
            model = llmslim.from_pretrained(cmd["src"], llmslim.SlimConfig(weights=cmd["weights"]), progress=False)
            tokenizer = AutoTokenizer.from_pretrained(cmd["src"])
            llmslim.save_pretrained(model, cmd["out"], format="bnb", overwrite=True, tokenizer=tokenizer)
        elif cmd["writer"] == "merge":
            merge(cmd["src"], cmd["adapter"], cmd["out"], weights=cmd["weights"], overwrite=True)
        elif cmd["writer"] == "checkpoint":
            torch.manual_seed(cmd["seed"])
            model = torch.nn.Linear(4, 3)
            optimizer = torch.optim.AdamW(model.parameters())
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            checkpoint.save_checkpoint(cmd["run"], cmd["step"], model, optimizer, {"seed": cmd["seed"]}, keep=2)


    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                instrument(cmd.get("point"))
                run(cmd)
            except BaseException as err:
                print("failed", repr(err), flush=True)
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print("pid", pid, flush=True)
        if cmd.get("kill_after") is not None:
            time.sleep(cmd["kill_after"])
            os.kill(pid, signal.SIGKILL)  # our own child, running or a zombie: never another process with its pid
        print("exit", os.waitpid(pid, 0)[1], flush=True)  # reaped: its pid no longer runs
    """
)


TIMEOUT = 120  # seconds without a line from the zygote: a writer hangs


class Zygote:
    """The zygote process: `run(cmd)` forks a writer; with `cmd["point"]` the writer is SIGKILLed there, with `kill_after`
    the zygote kills it after that many seconds."""

    def __init__(self, folder: Path):
        self.log = open(folder / "zygote.log", "w")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def run(self, cmd: dict, kill_after: float | None = None) -> str:
        """'done', 'killed' (at `cmd["point"]`, or after `kill_after` seconds) or 'failed ...'."""
        cmd = {**cmd, "kill_after": kill_after}
        self.proc.stdin.write(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in cmd.items()}) + "\n")
        self.proc.stdin.flush()
        pid, stopped, result = None, False, "done"
        while True:
            try:
                line = self._line()
            except TimeoutError:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)  # no "exit" line yet, so not reaped: still the writer's pid
                raise
            if line.startswith("pid "):
                pid = int(line.split()[1])
            elif line.startswith("stopped "):
                stopped = True
            if stopped and pid is not None:
                os.kill(pid, signal.SIGKILL)  # stopped, so alive and not yet reaped by the zygote: the pid is still the writer's
                stopped = False
            if line.startswith("failed "):
                result = line
            elif line.startswith("exit "):
                status = int(line.split()[1])
                if os.WIFSIGNALED(status):
                    return "killed"
                return result if status == 0 or result != "done" else f"failed with status {status}"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output: the zygote exited

    def _line(self) -> str:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise TimeoutError(f"no word from the zygote or its writer in {TIMEOUT} s: see {self.log.name}") from None
        if not line:
            raise RuntimeError(f"the zygote died: see {self.log.name}")
        return line.strip()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("base") / "model", layers=1)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    from finetune.test_merge import write_adapter

    return write_adapter(base, tmp_path_factory.mktemp("adapter") / "adapter", "nf4")


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """File name -> bytes of every file under `folder`; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


WRITERS = ("quantize", "save", "merge")
POINTS = ("tmp", "file", "aside", "swap", "remove")
# what OUT holds once the writer is killed at each point ("old" is put back by the next write's cleanup at "swap")
EXPECTED = {"tmp": "old", "file": "old", "aside": "old", "swap": None, "remove": "new"}


def command(writer: str, base: Path, adapter: Path, out: Path, version: str) -> dict:
    weights = {"old": "nf4", "new": "int8"}[version]
    return {"writer": writer, "src": base, "adapter": adapter, "out": out, "weights": weights}


@pytest.fixture(scope="module")
def references(zygote, base, adapter, tmp_path_factory):
    """What each writer writes, run to the end: {(writer, "old" / "new"): snapshot}."""
    root = tmp_path_factory.mktemp("reference")
    found = {}
    for writer in WRITERS:
        for version in ("old", "new"):
            out = root / f"{writer}-{version}"
            assert zygote.run(command(writer, base, adapter, out, version)) == "done"
            found[writer, version] = snapshot(out)
    assert all(found[w, "old"] != found[w, "new"] for w in WRITERS)
    return found


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("writer", WRITERS)
def test_killed_writer_never_leaves_a_partial_output(zygote, references, base, adapter, tmp_path, writer, point):
    out = tmp_path / "out"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert zygote.run(command(writer, base, adapter, out, "old")) == "done"

    assert zygote.run({**command(writer, base, adapter, out, "new"), "point": point}) == "killed"
    expected = EXPECTED[point]
    assert snapshot(out) == (None if expected is None else references[writer, expected])
    assert leftovers(tmp_path)  # what the killed writer left: hidden, named after OUT

    if point == "swap":  # OUT is missing: the next write puts the old one back first
        clean_leftovers(out)
        assert snapshot(out) == references[writer, "old"]
    assert zygote.run(command(writer, base, adapter, out, "new")) == "done"
    assert snapshot(out) == references[writer, "new"]
    assert leftovers(tmp_path) == [] and (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_writer_killed_at_random_times(zygote, references, base, adapter, tmp_path):
    """No instrumentation: SIGKILL after random delays; OUT is always old, new, or (put back by the next write) old."""
    out = tmp_path / "out"
    assert zygote.run(command("quantize", base, adapter, out, "old")) == "done"
    started = time.monotonic()
    assert zygote.run(command("quantize", base, adapter, tmp_path / "timing", "new")) == "done"
    duration = time.monotonic() - started
    rng = random.Random(0)
    for _ in range(6):
        zygote.run(command("quantize", base, adapter, out, rng.choice(["old", "new"])), kill_after=rng.uniform(0, duration))
        assert snapshot(out) in (None, references["quantize", "old"], references["quantize", "new"])
        clean_leftovers(out)
        assert snapshot(out) in (references["quantize", "old"], references["quantize", "new"])
        assert leftovers(tmp_path) == []


def checkpoint_command(run: Path, step: int, seed: int, point: str | None = None) -> dict:
    return {"writer": "checkpoint", "run": run, "step": step, "seed": seed, "point": point}


@pytest.mark.parametrize("point", [*POINTS, "prune"])
def test_killed_checkpoint_save_never_leaves_a_partial_checkpoint(zygote, tmp_path, point):
    run, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        assert zygote.run(checkpoint_command(run, step, seed=0)) == "done"
    saved = {step: snapshot(folder / f"step-000000{step}") for step in (1, 2)}
    # "prune" saves step 3 (pruning step 1); the others save step 2 again with other values
    step, seed = (3, 0) if point == "prune" else (2, 1)
    assert zygote.run(checkpoint_command(run, step, seed, point)) == "killed"
    reference = tmp_path / "reference"
    assert zygote.run(checkpoint_command(reference, step, seed)) == "done"
    new = snapshot(reference / "checkpoints" / f"step-000000{step}")

    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if point == "prune":
        assert names == ["step-0000002", "step-0000003"] and snapshot(folder / "step-0000003") == new
    else:
        assert snapshot(folder / "step-0000001") == saved[1]
        assert snapshot(folder / "step-0000002") == {"old": saved[2], None: None, "new": new}[EXPECTED[point]]
    assert leftovers(folder)

    assert zygote.run(checkpoint_command(run, 4, seed=0)) == "done"  # the next save cleans up (and prunes)
    assert leftovers(folder) == []
    if point == "prune":
        assert sorted(p.name for p in folder.iterdir()) == ["step-0000003", "step-0000004"]
    else:  # at "swap", step 2 was put back with its old values by that save
        assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000004"]
        assert snapshot(folder / "step-0000002") == (new if EXPECTED[point] == "new" else saved[2])
