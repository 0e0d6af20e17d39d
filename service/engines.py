"""The inference engines that can run the artifact's ``model.onnx``: ONNX Runtime (the default) and OpenVINO.

An engine opens the graph as a *session*: an object with ONNX Runtime's ``InferenceSession`` interface as far
as the service uses it (``run(output_names, feeds)``, ``get_inputs()``, ``get_outputs()``, ``get_providers()``).
ONNX Runtime's own session is that object; OpenVINO's compiled model is wrapped to it (``OpenVinoSession``). So
``LoadedModel``, the golden check and the benches run either engine through one path, and a second engine is
one class here, not a copy of the loading code.

``open_sessions`` returns the session for a call that starts alone and, on the CPU, the one for a call that
starts while another runs (``Settings.busy_intra_op_threads``: one thread per concurrent photo). An engine
that is not installed, or that refuses the graph, raises ``EngineError`` with one line naming the engine and
what to do.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.settings import Settings

INSTALL_HINT = {"openvino": "pip install 'deepmad-bin[openvino]' (or build the image with --build-arg ENGINE=openvino)"}


class EngineError(RuntimeError):
    """The configured engine cannot run this graph here: not installed, or it refuses the graph."""


class Session(Protocol):
    """What the service needs of an engine's session (ONNX Runtime's ``InferenceSession`` has all of it)."""

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def get_providers(self) -> list[str]: ...


@dataclass(frozen=True)
class Sessions:
    engine: str  # "onnxruntime-1.32.0", "openvino-2026.4.1"
    lone: Session
    busy: Session | None  # None: every call runs on ``lone``


def open_sessions(settings: Settings, model_path: Path) -> Sessions:
    """Open ``model_path`` with ``settings.engine``; EngineError with a one-line reason."""
    if settings.engine == "openvino":
        return _open_openvino(settings, model_path)
    return _open_onnxruntime(settings, model_path)


# ONNX Runtime ----------------------------------------------------------------------------------------------


def choose_providers(requested: list[str]) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise EngineError(f"execution providers {missing} are not available; this build has {available}")
        return list(requested)
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


GRAPH_OPTIMIZATION = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(settings: Settings, intra_op_threads: int | None = None) -> ort.SessionOptions:
    """Threads, spinning and graph optimisation from the settings (measured in bench/serve.py);
    ``intra_op_threads`` instead of the settings' (the busy session)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads if intra_op_threads is None else intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = GRAPH_OPTIMIZATION[settings.graph_optimization]
    spinning = "1" if settings.ort_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    # Memory (a 1 GB bin controller; bench/footprint.py): every session allocates from one process-wide arena
    # that grows by what is asked, and without memory patterns (a pre-planned block per input shape).
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    _register_shared_arena()
    options.log_severity_level = 3
    return options


_ARENA_LOCK = threading.Lock()
_arena_registered = False


def _register_shared_arena() -> None:
    """One CPU arena for every session of this process: the busy session and a reloaded model reuse the blocks
    the first session freed instead of growing arenas of their own, and a block is extended by what a run asks
    (``kSameAsRequested``), not to the next power of two. Measured with both sessions after 100 requests: the
    Lite0 model's peak 373 -> 181 MB with ``limit_heap_retention``, CPU per photo unchanged."""
    global _arena_registered
    with _ARENA_LOCK:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        same_as_requested = 1
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, same_as_requested, -1, -1))
        _arena_registered = True


def wants_busy_session(settings: Settings, providers: list[str]) -> bool:
    """A second session only on the CPU (a GPU call does not split across CPU threads) and only when its
    thread count differs from the first's."""
    busy = settings.busy_intra_op_threads
    return providers == ["CPUExecutionProvider"] and busy > 0 and busy != settings.intra_op_threads


def _open_onnxruntime(settings: Settings, model_path: Path) -> Sessions:
    providers = choose_providers(settings.providers)

    def open_one(options: ort.SessionOptions) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise EngineError(f"ONNX Runtime cannot load {model_path}: {exc}") from None

    lone = open_one(session_options(settings))
    busy = None
    if wants_busy_session(settings, providers):
        busy = open_one(session_options(settings, settings.busy_intra_op_threads))
    return Sessions(f"onnxruntime-{ort.__version__}", lone, busy)


# OpenVINO ----------------------------------------------------------------------------------------------------

# OpenVINO's CPU plugin picks bf16 by itself on CPUs with avx512_bf16 or AMX. On this box (AMD EPYC Zen 4, avx512_bf16
# without AMX) bf16 moved the Lite0 graph's golden outputs by up to 0.19 score units (31 of 48 past the fp32
# tolerance) for 1.65x at batch 1: a different function, so the service pins f32, which reproduces ONNX
# Runtime's outputs to 4e-6. bf16 is a measured option of the benches (bench.pretrained --serving), not served.
PRECISION = "f32"

_OV_TYPES = {"u8": "tensor(uint8)", "f32": "tensor(float)", "i64": "tensor(int64)", "i32": "tensor(int32)"}


@dataclass(frozen=True)
class NodeArg:
    """An input or output as ONNX Runtime describes it (``name``, ``type``, ``shape`` with str for a free dim)."""

    name: str
    type: str
    shape: list[int | str]


def _node_arg(port: Any) -> NodeArg:
    shape = [dim.get_length() if dim.is_static else "N" for dim in port.get_partial_shape()]
    kind = port.get_element_type().get_type_name()
    return NodeArg(port.get_any_name(), _OV_TYPES.get(kind, f"tensor({kind})"), shape)


class OpenVinoSession:
    """An OpenVINO compiled model behind ONNX Runtime's session interface.

    An ``InferRequest`` runs one call at a time, so calls take one from a pool (made on demand: as many as
    calls ever ran at once, bounded by the service's ``decode_concurrency``); the compiled model runs them on
    its streams side by side. Outputs are copied out of the request before it goes back to the pool."""

    def __init__(self, compiled: Any, label: str):
        self._compiled = compiled
        self._label = label
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._inputs = [_node_arg(port) for port in compiled.inputs]
        self._outputs = [_node_arg(port) for port in compiled.outputs]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            request.infer(feeds)
            names = output_names or [arg.name for arg in self._outputs]
            return [np.array(request.get_tensor(name).data) for name in names]
        finally:
            self._requests.put(request)

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [self._label]

    def get_property(self, name: str) -> Any:
        """The compiled model's effective property (``INFERENCE_NUM_THREADS``, ``NUM_STREAMS``, ...)."""
        return self._compiled.get_property(name)


def openvino_config(threads: int, streams: int) -> dict[str, object]:
    """Compile options for the CPU plugin: f32 pinned (``PRECISION``), ``threads`` in all (0: OpenVINO's own
    count, one per core) over ``streams`` streams.

    The service compiles the graph twice, as it opens two ONNX Runtime sessions: one stream with every thread
    for a call that starts alone (what OpenVINO's LATENCY hint picks), and one stream per core of one thread
    each for calls beside others (what its THROUGHPUT hint picks on this box). Measured in process on this
    2-core AMD EPYC Zen 4 (avx512_vnni + avx512_bf16, no AMX) shared with other jobs, one photo per call, c4 = four
    threads calling, arms interleaved in rounds (a scratch script of the same loop as bench.serve's in-process
    references); "pair" is the shipped choice:

    | model | arm | c1 ms | c4 photos/s | CPU ms/photo c4 |
    |---|---|---|---|---|
    | Lite0 224, load 4.3-5.2, 3 rounds | ONNX Runtime, the service's two sessions | 27.1 | 52.2 | 9.67 |
    | | OpenVINO 1 stream x 2 threads (LATENCY) alone | 33.5 | 66.8 | 13.54 |
    | | OpenVINO 2 streams x 1 thread (THROUGHPUT) alone | 23.8 | 105.5 | 10.23 |
    | | OpenVINO pair | 19.3 | 85.0 | 10.23 |
    | | OpenVINO LATENCY, CPU pinning off | 18.5 | 48.2 | 10.63 |
    | 32x32, same run | ONNX Runtime, the service's two sessions | 1.65 | 620 | 3.09 |
    | | OpenVINO THROUGHPUT alone | 2.96 | 737 | 2.69 |
    | | OpenVINO pair | 1.47 | 744 | 2.67 |
    | Lite0 224, load 10-11, 5 rounds | ONNX Runtime, the service's two sessions | 10.7 | 51.0 | 9.99 |
    | | OpenVINO pair | 32.8 | 61.1 | 10.56 |
    | | OpenVINO 2 streams x 1 thread alone | 31.3 | 57.6 | 10.52 |
    | | OpenVINO LATENCY alone | 31.9 | 70.3 | 11.85 |
    | | OpenVINO pair, CPU pinning off | 39.2 | 40.4 | 10.61 |
    | 32x32, load 11-14, 5 rounds | ONNX Runtime, the service's two sessions | 7.61 | 113 | 3.61 |
    | | OpenVINO pair | 12.4 | 386 | 2.90 |
    | | OpenVINO 2 streams x 1 thread alone | 7.56 | 389 | 2.86 |

    CPU per photo holds still across runs (OpenVINO f32 within 6% of ONNX Runtime on Lite0, 20% below it on
    the 32x32 graph); the wall-clock columns move with the neighbours' load by 3x, and at load 10 every
    OpenVINO arm answered a lone Lite0 photo 3x slower than ONNX Runtime. No arm wins every column in both
    runs; the pair was best or level on c1 and c4 at load 5 and is the one whose settings mean what
    ``intra_op_threads`` and ``busy_intra_op_threads`` mean for ONNX Runtime. With f32 no faster per photo on
    the pretrained graph, ONNX Runtime stays the default engine (docs/performance.md)."""
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": PRECISION, "NUM_STREAMS": streams}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def one_line(exc: Exception) -> str:
    """OpenVINO's error text without its source locations (``Exception from src/...``, ``Check '...' failed``),
    on one line: e.g. "Model wasn't fully converted. No conversion rule found for operations: ai.onnx.ml.Scaler"."""
    lines = [line.strip(" -") for line in str(exc).splitlines()]
    kept = [line.rstrip(":") for line in lines if line and not line.startswith(("Exception from", "Check '"))]
    kept = [line for line in kept if line not in ("Summary", "FrontEnd API failed with OpConversionFailure")]
    return " ".join(kept)[:400] or type(exc).__name__


def _open_openvino(settings: Settings, model_path: Path) -> Sessions:
    try:
        import openvino as ov
    except ImportError as exc:
        raise EngineError(f"engine openvino is not installed ({exc}): {INSTALL_HINT['openvino']}") from None
    engine = f"openvino-{ov.get_version().split('-')[0]}"  # "2026.4.1-22982-e213a14..." -> the release
    core = ov.Core()
    label = f"OpenVINO:CPU:{PRECISION}"
    refused = f"engine openvino refuses {model_path}"
    try:
        graph = core.read_model(str(model_path))  # read once, compiled for each session
    except Exception as exc:  # OpenVINO raises RuntimeError/GeneralFailure with multi-line text
        raise EngineError(f"{refused}: {one_line(exc)}; serve it with DEEPMAD_ENGINE=onnxruntime") from None

    def open_one(threads: int, streams: int) -> OpenVinoSession:
        try:
            compiled = core.compile_model(graph, "CPU", openvino_config(threads, streams))
        except Exception as exc:
            raise EngineError(f"{refused}: {one_line(exc)}; serve it with DEEPMAD_ENGINE=onnxruntime") from None
        return OpenVinoSession(compiled, label)

    lone = open_one(settings.intra_op_threads, 1)
    busy = None
    per_call = settings.busy_intra_op_threads
    if per_call > 0 and per_call != settings.intra_op_threads:
        streams = max(1, len(os.sched_getaffinity(0)) // per_call)
        busy = open_one(streams * per_call, streams)
    return Sessions(engine, lone, busy)
