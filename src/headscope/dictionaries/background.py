"""Residual dictionaries that keep training while the server runs, swapped in as they finish.

:class:`LiveDictionaries` is the dictionary basis a server holds: it starts with the layers
already finished in its folder (maybe none) and :meth:`LiveDictionaries.start` trains the rest
in a child process (``headscope train-resid``, at low priority, its progress bars on the
terminal). A watcher thread adds each layer to the basis when its ``stats.json`` appears, so
feature-basis attributions of that layer work from then on; :meth:`status` (served in
``/api/health``) says how far the training is and when it should end. The child writes
everything into the folder, so an interrupted training resumes where it stopped, and a finished
one is never repeated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.layerwise import STATUS_FILENAME, LayerwiseConfig, layers_done
from headscope.errors import InputError
from headscope.files import read_json


class LiveDictionaries(DictionarySet):
    """The finished residual dictionaries of ``folder`` made with ``cfg`` for ``layers``,
    growing while :meth:`start`'s training runs."""

    def __init__(self, folder: Path | str, cfg: LayerwiseConfig, layers: Sequence[int]):
        self.folder = Path(folder)
        self.cfg = cfg
        self.layers = [int(x) for x in layers]
        self.by_layer = {}
        self.name = f"sae:{self.folder}"
        self._done: list[int] = []
        self._proc: subprocess.Popen | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.refresh()

    @property
    def complete(self) -> bool:
        return len(self._done) == len(self.layers)

    def refresh(self) -> list[int]:
        """Load the layers finished since the last call; returns them."""
        done = layers_done(self.folder, self.cfg, self.layers)
        new = [layer for layer in done if layer not in self._done]  # in training order
        if new:
            loaded = DictionarySet(self.folder)
            # Swapped in whole (one assignment per attribute): a request reading the basis sees
            # the old set or the new one.
            by_layer = {layer: d for layer, d in loaded.by_layer.items() if layer in done}
            for key, value in vars(loaded).items():
                if key not in ("by_layer", "name"):
                    setattr(self, key, value)
            self.by_layer = by_layer
            self._done = sorted(done)
        return new

    def for_layer(self, layer: int):
        if layer not in self.by_layer and layer in self.layers and not self.complete:
            st = self.status() or {}
            eta = st.get("eta_seconds")
            raise InputError(
                f"layer {layer}'s dictionary is still training ({len(self._done)} of "
                f"{len(self.layers)} layers done"
                + (f", about {_minutes(eta)} left" if eta else "")
                + f"); ready: {sorted(self.by_layer)}"
            )
        return super().for_layer(layer)

    def status(self) -> dict[str, Any] | None:
        """The training's progress (``status.json`` of the folder) with ``running`` and the
        layers loaded; None when no training was ever started here."""
        path = self.folder / STATUS_FILENAME
        if not path.is_file() and self._proc is None:
            return None
        try:
            st = read_json(path) if path.is_file() else {}
        except (OSError, ValueError):
            st = {}
        return {
            "phase": st.get("phase", "starting"),
            "running": self.running,
            "layers": self.layers,
            "layers_ready": sorted(self.by_layer),
            "tokens": st.get("tokens", 0),
            "tokens_total": st.get("tokens_total", self.cfg.n_tokens),
            "eta_seconds": st.get("eta_seconds"),
            "elapsed_seconds": st.get("elapsed_seconds"),
        }

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, nice: int = 10, threads: int | None = 1) -> list[str]:
        """The ``headscope train-resid`` command line that trains the missing layers.

        One thread by default: the server keeps the other cores, and on a busy CPU one thread
        does the same work in half the CPU time of two (docs/dictionaries.md)."""
        c = self.cfg
        cmd = [sys.executable, "-m", "headscope", "train-resid", "--out", str(self.folder)]
        cmd += ["--model", c.model, "--data", c.data, "--text-field", c.text_field]
        cmd += ["--layers", *map(str, self.layers)]
        for flag, value in (
            ("--n-features", c.n_features),
            ("--k", c.k),
            ("--tokens", c.n_tokens),
            ("--epochs", c.epochs),
            ("--n-eval", c.n_eval),
            ("--seq-len", c.seq_len),
            ("--batch-size", c.batch_size),
            ("--sae-batch-size", c.sae_batch_size),
            ("--label-tokens", c.label_tokens),
            ("--edges", c.edges),
            ("--shard-tokens", c.shard_tokens),
            ("--seed", c.seed),
            ("--lr", c.lr),
            ("--nice", nice),
            ("--threads", threads),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        return cmd

    def start(
        self,
        *,
        log: Callable[[str], None] = print,
        poll: float = 2.0,
        nice: int = 10,
        env: dict[str, str] | None = None,
    ) -> bool:
        """Train the missing layers in a child process; False when none are missing.

        The watcher thread loads each finished layer within ``poll`` seconds and logs it."""
        if self.complete:
            return False
        self._proc = subprocess.Popen(self.command(nice), env=env)
        self._stop.clear()

        def watch() -> None:
            while True:
                exited = self._proc is None or self._proc.poll() is not None
                for layer in self.refresh():
                    log(
                        f"dictionaries: layer {layer} ready and swapped in "
                        f"({len(self._done)} of {len(self.layers)})"
                    )
                if exited or self._stop.wait(poll):
                    break
            if self._proc is not None and self._proc.returncode not in (0, None):
                log(
                    f"dictionaries: background training stopped (exit {self._proc.returncode}); "
                    f"{len(self._done)} of {len(self.layers)} layers ready; the next start resumes"
                )

        self._watcher = threading.Thread(target=watch, name="dictionary-watcher", daemon=True)
        self._watcher.start()
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the training to end (None: still running after ``timeout``)."""
        if self._proc is None:
            return 0
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._watcher is not None:
            self._watcher.join()
        return code

    def stop(self, grace: float = 10.0) -> None:
        """Interrupt the training (it resumes on the next start) and stop watching."""
        self._stop.set()
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGINT)  # the child writes nothing half: it just exits
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._watcher is not None:
            self._watcher.join()


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def set_low_priority(nice: int) -> None:
    """Lower this process's scheduling priority by ``nice`` (POSIX; no-op elsewhere)."""
    if nice > 0 and hasattr(os, "nice"):
        os.nice(nice)


__all__ = ["LiveDictionaries", "set_low_priority"]
