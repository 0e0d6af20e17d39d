"""All service settings in one place: env vars ``DEEPMAD_*`` (and flags of ``python -m service``).

The defaults serve the shipped model on a laptop: ``models/trashnet`` beside this package, on
127.0.0.1:8000, CPU (or CUDA when onnxruntime-gpu sees a GPU), no admin token (admin actions off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "trashnet"
ENV_PREFIX = "DEEPMAD_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, protected_namespaces=(), extra="ignore")

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="folder holding model.onnx + manifest.json")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port (0 picks a free one)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    threshold: float | None = Field(None, description="override the manifest's gamma (score >= threshold -> anomalous)")
    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0, description="largest accepted image, in bytes")
    max_pixels: int = Field(50_000_000, gt=0, description="largest accepted image, width x height")
    max_batch_items: int = Field(32, gt=0, description="most images in one POST /classify/batch")
    max_batch_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest POST /classify/batch body")
    decode_concurrency: int = Field(
        4, gt=0, description="images decoded and scored at once (threads); bounds memory under load"
    )
    decode_inline: bool = Field(
        False,
        description="decode and score /classify images on the event loop instead of in worker threads (saves "
        "a thread hand-off per request; one slow image then holds up every other request; bench/serve.py)",
    )

    engine: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime",
        description="inference engine for model.onnx: onnxruntime, or openvino (CPU, f32; the openvino extra). "
        "The same artifact and golden check either way (service/engines.py; measured in docs/performance.md)",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="engine threads for a call that starts alone (ONNX Runtime intra-op threads, OpenVINO "
        "INFERENCE_NUM_THREADS; 0: the engine's default, one per core)",
    )
    busy_intra_op_threads: int = Field(
        1,
        ge=0,
        description="engine threads for a CPU call that starts while another is running (a second session of the "
        "same graph): a lone photo gets intra_op_threads for its latency, photos scored side by side one core "
        "each (less CPU per request under load; docs/performance-log.md); 0: one session for all",
    )
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime inter-op threads (0: its default)")
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime's idle intra-op threads spin-wait (ORT's default: saves a little on an "
        "idle dedicated box, burns the CPU that concurrent requests and neighbours need; bench/serve.py)",
    )
    graph_optimization: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    microbatch_max_items: int = Field(
        1, gt=0, description="dynamic micro-batching: most images in one ONNX Runtime call (1: off)"
    )
    microbatch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="micro-batching: how long a batch may wait for more requests after its first; only "
        "under concurrent load (a lone request never waits); 0: batch only what is already queued",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order; empty: CUDA if available, then CPU",
    )

    no_item_check: bool = Field(
        True,
        description="answer verdict no_item for a frame with no item in it (empty chamber, covered lens, lights off, "
        "blinding light, a flat colour, noise), judged by image statistics before the graph (service/no_item.py); "
        "false: every frame gets the graph's normal/anomalous verdict",
    )

    drift_window: int = Field(
        500,
        gt=0,
        description="recent scores compared with the manifest's held-out normal quantiles for the drift gauges",
    )

    admin_token: str | None = Field(None, description="token for POST /admin/reload; unset disables it")
    require_model: bool = Field(
        True, description="fail at startup without a loadable model (false: start, 503 until a reload)"
    )

    capture_dir: Path | None = Field(
        None, description="keep photos for labelling and retraining in this folder; unset: capture is off"
    )
    capture_margin: float = Field(
        0.5,
        ge=0,
        description="capture every item whose score lies within this distance of the threshold (score "
        "units; 0.5 around the shipped model's gamma is probability 0.36-0.64)",
    )
    capture_normal_rate: float = Field(
        0.05, ge=0, le=1, description="share of confident normal items captured (anomalous ones always are)"
    )
    capture_max_bytes: int = Field(
        1 << 30, gt=0, description="byte budget of the capture folder; the oldest unlabelled captures go first"
    )
    capture_queue_size: int = Field(
        256, gt=0, description="captures waiting for the background writer; beyond it they are dropped"
    )
    capture_mode: Literal["queued", "durable"] = Field(
        "queued",
        description="queued: answer at once, the photo written in the background (capture.status queued; a "
        "kill -9 loses what is queued); durable: answer only once the photo is fsynced (capture.status "
        "written), at the cost of the writer's batch latency (docs/flywheel.md)",
    )
    operator_token: str | None = Field(
        None, description="token for POST /feedback, GET /captures and /review; unset disables them"
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        # "CUDAExecutionProvider,CPUExecutionProvider" as well as a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("admin_token", "operator_token", "capture_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # docker-compose passes `${DEEPMAD_OPERATOR_TOKEN:-}` as an empty string: unset, not "".
        return None if value == "" else value
