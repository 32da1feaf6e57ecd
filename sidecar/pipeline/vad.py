"""Silero VAD (ONNX) for streaming use, one state per speaker.

The model file comes from the ``silero-vad`` package. That package imports
torch when imported, which the sidecar does not need, so the file is located
through the import system without importing the package, and run with
onnxruntime directly. Install it with ``pip install --no-deps silero-vad``.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

WINDOW = 512  # samples at 16 kHz = 32 ms, the model's window
CONTEXT = 64  # samples of the previous window the model expects in front


class VadModelMissing(RuntimeError):
    pass


def silero_model_path() -> Path:
    """The ONNX file shipped in the silero-vad package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadModelMissing(
            "the silero-vad package is not installed: run "
            "`pip install --no-deps silero-vad` (its ONNX model is all the sidecar uses)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise VadModelMissing(f"silero-vad is installed but {path} is missing")
    return path


class SileroVad:
    """Shared ONNX session; per-stream state lives in :class:`VadState`.

    ``probs`` takes one window from each of several streams at once, so the
    cost of many simultaneous speakers is one batched call.
    """

    def __init__(self, path: Path | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path or silero_model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(16000, dtype=np.int64)
        self._lock = threading.Lock()

    def new_state(self) -> VadState:
        return VadState()

    def probs(self, states: list[VadState], windows: list[np.ndarray]) -> list[float]:
        """Speech probability of one 512-sample window for each stream."""
        if not states:
            return []
        x = np.stack(
            [np.concatenate([s.context, w]) for s, w in zip(states, windows, strict=True)]
        ).astype(np.float32, copy=False)
        state = np.concatenate([s.rnn for s in states], axis=1)
        with self._lock:
            out, new_state = self._session.run(None, {"input": x, "state": state, "sr": self._sr})
        for i, s in enumerate(states):
            s.rnn = new_state[:, i : i + 1, :].copy()
            s.context = windows[i][-CONTEXT:].astype(np.float32, copy=True)
        return [float(p) for p in out[:, 0]]

    def prob(self, state: VadState, window: np.ndarray) -> float:
        return self.probs([state], [window])[0]


class VadState:
    __slots__ = ("context", "rnn")

    def __init__(self) -> None:
        self.rnn = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)

    def reset(self) -> None:
        self.rnn[:] = 0
        self.context[:] = 0
