"""Where a model is timed and deployed: eager PyTorch, or onnxruntime (the optional ``autodac[deploy]`` extra).

A latency budget only means something on the runtime the model will run on: the same plan
re-timed in onnxruntime runs at another ratio than in eager torch (onnxruntime fuses
conv + BatchNorm + ReLU and picks its own kernels). A ``Runtime`` turns a module and the
arguments of its calls into a callable that runs them there, so ``autodac.latency`` times
every runtime the same way (medians, interleaved side-by-side runs, one cache keyed by
runtime and version).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autodac._logging import get_logger
from autodac.errors import AutodacError

__all__ = ["Runtime", "RUNTIMES", "get_runtime", "require_onnx", "onnx_bytes", "onnx_session", "onnx_feeds"]

logger = get_logger(__name__)

_DEPLOY_HINT = "pip install 'autodac[deploy]' (or: pip install onnx onnxruntime)"


def require_onnx(what: str, session: bool = True) -> None:
    """Refuse ``what`` in one line naming what to install when onnx (or onnxruntime) is missing."""
    missing = []
    for module in ("onnx", *(("onnxruntime",) if session else ())):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise AutodacError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: {_DEPLOY_HINT}")


def onnx_bytes(module: nn.Module, args: tuple[Any, ...]) -> bytes:
    """``module`` (in its current mode) as a serialised ONNX model traced on ``args``.

    torch's TorchScript-based exporter first: it takes ~50 ms a layer where the dynamo exporter
    takes seconds, and latency tables export hundreds of layer options. The dynamo exporter
    (needs onnxscript) is the fallback for torch builds without the old one or graphs it cannot take.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the old exporter's deprecation notice, once per layer option
        buffer = io.BytesIO()
        try:
            torch.onnx.export(module, args, buffer, dynamo=False)
            return buffer.getvalue()
        except Exception as legacy:  # noqa: BLE001 - any failure of the old exporter: try the new one
            logger.info("TorchScript-based ONNX export failed (%s: %s); trying the dynamo exporter", type(legacy).__name__, legacy)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            try:
                program = torch.onnx.export(module, args, dynamo=True, external_data=False)
                program.save(path)
            except Exception as error:  # noqa: BLE001
                raise AutodacError(
                    f"the model must export to ONNX, but both of torch's exporters failed; the dynamo exporter said "
                    f"{type(error).__name__}: {error}"
                ) from error
            with open(path, "rb") as handle:
                return handle.read()


def onnx_session(model: bytes | str, threads: int | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's thread count, as eager timing uses)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_feeds(session, args: tuple[Any, ...]) -> dict[str, Any]:
    """The session's input dict from the tensor arguments of a call, in order."""
    tensors = [a.detach().cpu().numpy() for a in args if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise AutodacError(
            f"the exported ONNX graph must take every tensor argument, but it takes {len(names)} inputs for {len(tensors)} tensors"
        )
    return dict(zip(names, tensors))


@dataclass(frozen=True)
class Runtime:
    """One way to run a model: its name, its version, and how to prepare a module's calls for timing."""

    name: str

    @property
    def version(self) -> str:
        if self.name == "torch":
            return torch.__version__
        import onnxruntime

        return onnxruntime.__version__

    @property
    def key(self) -> str:
        """What a timing on this runtime depends on beyond the device: the runtime and its version."""
        return f"{self.name} {self.version}"

    def check(self, device: torch.device) -> None:
        """Refuse, in one line, a runtime that is not installed or cannot time on ``device``."""
        if self.name == "onnxruntime":
            require_onnx("runtime='onnxruntime'")
            if device.type != "cpu":
                raise AutodacError(
                    f"runtime='onnxruntime' times on its CPU execution provider, so the device must be 'cpu', but got device={str(device)!r}"
                )

    def runner(self, module: nn.Module, calls: Sequence[tuple[Any, ...]]) -> Callable[[], Any]:
        """A callable that runs ``module`` on each argument tuple of ``calls`` on this runtime (module in eval mode)."""
        if self.name == "torch":
            return lambda: [module(*args) for args in calls]
        prepared = []
        for args in calls:
            session = onnx_session(onnx_bytes(module, args))
            prepared.append((session, onnx_feeds(session, args)))
        return lambda: [session.run(None, feeds) for session, feeds in prepared]


RUNTIMES = {"torch": Runtime("torch"), "onnxruntime": Runtime("onnxruntime")}
TORCH = RUNTIMES["torch"]


def get_runtime(name: Any) -> Runtime:
    """The runtime called ``name``, or an error listing the known ones."""
    if isinstance(name, Runtime):
        return name
    if name not in RUNTIMES:
        raise AutodacError(f"`runtime` must be one of {sorted(RUNTIMES)}, but got runtime={name!r}")
    return RUNTIMES[name]
