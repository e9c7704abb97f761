"""Starting the training processes: one interface, a local ``torchrun`` implementation.

A :class:`Launcher` takes a validated run config and runs it on some set of processes,
returning the run's ``summary.json``; ``launcher.train(cfg)`` checks the layout for its
world size first, so a train step picks a launcher and calls every one the same way.
:class:`LocalTorchrunLauncher` starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m mtnlg.train.cli --config RESOLVED.yaml`` on this machine;
``mtnlg.cluster.launcher.ClusterJobLauncher`` (a Kubeflow TrainJob or PyTorchJob whose pods
run the same ``mtnlg.train.cli`` entry point) implements the same interface.

The processes receive the fully resolved config (recipe, file and overrides merged and
checked here), so every rank trains exactly what was validated before launch.
"""

from __future__ import annotations

import abc
import os
import signal
import subprocess
import sys
import tempfile
import threading

from mtnlg import storage
from mtnlg.config import ConfigError
from mtnlg.config import dump_yaml
from mtnlg.formats.rundir import RUN_CONFIG, SUMMARY_FILE
from mtnlg.progress import get_logger
from mtnlg.formats.runlog import read_summary
from mtnlg.train.config import TrainRunConfig

log = get_logger("mtnlg.train.launch")


class LaunchError(RuntimeError):
    """The training processes failed; the message says how and where to look."""


class Launcher(abc.ABC):
    """Runs a training job to the end and returns its summary (``summary.json``)."""

    @abc.abstractmethod
    def launch(self, cfg: TrainRunConfig) -> dict:
        """Train ``cfg`` (already validated for this launcher's world size)."""

    @property
    @abc.abstractmethod
    def world_size(self) -> int:
        """Number of training processes the launcher starts."""

    def train(self, cfg: TrainRunConfig) -> dict:
        """Check ``cfg``'s layout for :attr:`world_size` (``ConfigError`` before any process
        starts), then :meth:`launch` it; returns ``summary.json``'s content."""
        cfg.check_layout(self.world_size)
        return self.launch(cfg)


class LocalTorchrunLauncher(Launcher):
    """``torchrun --standalone`` with ``nproc`` processes on this machine.

    Output of the processes streams to this process's stdout/stderr. SIGTERM or SIGINT
    received here is passed on as SIGTERM to the training processes, so they save a
    checkpoint and stop; such a stop counts as success.
    """

    def __init__(self, nproc: int, python: str | None = None):
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        self.nproc = nproc
        self.python = python or sys.executable

    @property
    def world_size(self) -> int:
        return self.nproc

    def command(self, config_path: str) -> list[str]:
        return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                "-m", "mtnlg.train.cli", "--config", config_path]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # torchrun would pin every process to 1 thread; share the cores out instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Python's safe-path mode: `-m` does not put the current directory first on sys.path,
        # so a folder named `mtnlg` (a clone, say) where training is started cannot shadow
        # the installed package in torchrun or its children.
        env["PYTHONSAFEPATH"] = "1"
        return env

    def launch(self, cfg: TrainRunConfig) -> dict:
        from mtnlg.train.data import preflight_problems
        from mtnlg.train.device import check_dtype_supported, resolve_device

        check_dtype_supported(cfg.train.dtype, resolve_device(cfg.train.device))  # this machine runs the processes
        problems = preflight_problems(cfg)
        if problems:  # one message, before any training process starts
            raise ConfigError("cannot start training:\n  - " + "\n  - ".join(problems))
        if storage.exists(storage.join(cfg.output, SUMMARY_FILE)):
            storage.remove(storage.join(cfg.output, SUMMARY_FILE))  # so a stale one is never returned
        with tempfile.TemporaryDirectory(prefix="mtnlg-launch-") as d:
            config_path = os.path.join(d, RUN_CONFIG)
            with open(config_path, "w", encoding="utf-8") as f:
                f.write(dump_yaml(cfg))
            cmd = self.command(config_path)
            log.info("launching: %s", " ".join(cmd))
            proc = subprocess.Popen(cmd, env=self.environment(), start_new_session=True)
            signalled = self._forward_signals(proc)
            try:
                rc = proc.wait()
            except BaseException:
                _terminate_group(proc)
                proc.wait()
                raise
            finally:
                signalled.restore()
        summary = read_summary(cfg.output)
        if rc == 0 and summary is not None:
            return summary
        if summary is not None and summary.get("stopped") == "signal":
            # torchrun reports its own SIGTERM as a failure; the trainer stopped cleanly.
            return summary
        if summary is not None and summary.get("stopped") == "diverged":
            raise LaunchError(f"training diverged: {summary.get('error')}")
        raise LaunchError(f"training processes exited with code {rc} (output {cfg.output}); see the log above")

    def _forward_signals(self, proc: subprocess.Popen) -> "_SignalForwarding":
        return _SignalForwarding(proc)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _terminate_group(proc: subprocess.Popen) -> None:
    """SIGTERM the training processes (torchrun's children) so that they checkpoint and
    exit 0, and torchrun with them; where the children cannot be listed, the whole group."""
    workers = _children(proc.pid)
    try:
        if workers:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


class _SignalForwarding:
    """While installed, SIGTERM/SIGINT here become SIGTERM to ``proc``'s training processes."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.old: dict[int, object] = {}
        self.received: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum
        log.warning("received signal %d: asking the training processes to checkpoint and stop", signum)
        _terminate_group(self.proc)

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def run_local(cfg: TrainRunConfig, nproc: int = 1) -> dict:
    """Train ``cfg`` locally with ``nproc`` processes (torchrun); returns ``summary.json``'s
    content. Layout errors (``ConfigError``) are raised before any process starts."""
    return LocalTorchrunLauncher(nproc).train(cfg)
