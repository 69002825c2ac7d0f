"""Service configuration from ``CXR_*`` environment variables, validated once at startup."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.backend_choice import Backend
from app.core.coded_error import first_validation_error
from app.core.conversion_cache import default_cache_dir
from app.core.decode_pool import (
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_LARGE_DECODE_BYTES,
    MAX_DECODE_LIMIT,
    MAX_DECODE_TIMEOUT_S,
)
from app.core.dicom import DicomPolicy
from app.core.engine import DEVICE_PATTERN, Precision
from app.core.input_guard import GuardMode
from app.core.preprocessing import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS

MiB = 1024 * 1024
DAY_S = 86_400  # the bound of every time setting: longer is a typo, and some waits overflow far beyond it


class SettingsError(ValueError):
    """A ``CXR_*`` variable is invalid; the message is one line naming it."""


class Settings(BaseSettings):
    """Every knob of the service; defaults suit one GPU behind a load balancer."""

    # Every number finite and bounded: an infinite timeout or 10^20 workers was accepted, then hung or failed
    # the service at its first use instead of stopping it at startup with the variable's name.
    model_config = SettingsConfigDict(env_prefix="CXR_", extra="ignore", frozen=True, allow_inf_nan=False)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    weights: Path = Path("weights")
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    precision: Precision = Field(
        "auto", description="auto, fp32, bf16, fp16 (GPU) or int8 (CXR_BACKEND=openvino/auto on a CPU host)."
    )
    backend: Backend = Field(
        "torch",
        description="torch, openvino (CPU fast path) or auto (torch on a GPU; on a CPU OpenVINO in the fastest "
        "precision the model's accuracy gate approves).",
    )
    cache_dir: Path | None = Field(
        default_factory=default_cache_dir,
        description="Where OpenVINO conversions are cached (keyed by the weights' sha256); off: convert every start.",
    )
    input_guard: GuardMode = Field(
        "reject",
        description="Images the input guard fails: reject (422), flag (200 with a warning) or off (unchecked).",
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Images per forward pass at most (on the CPU an upper bound for the probe)."
    )
    max_wait_ms: float | None = Field(
        None, ge=0, le=10_000, description="How long a batch waits to fill up; unset: 5 ms on a GPU, 0 on the CPU."
    )
    batch_probe_s: float = Field(
        3.0,
        ge=0,
        le=60,
        description="CPU only: at most this many seconds at startup for timing batch sizes up to CXR_MAX_BATCH_SIZE "
        "and keeping the largest that does not lower throughput; 0: use CXR_MAX_BATCH_SIZE as is.",
    )
    queue_size: int = Field(512, ge=1, le=65_536, description="Images waiting for the GPU before requests get 503.")
    request_timeout_s: float = Field(30.0, gt=0, le=DAY_S, description="Decode + queue + inference budget per request.")
    max_upload_bytes: int = Field(20 * MiB, ge=1, le=MAX_DECODE_LIMIT, description="Largest request body accepted.")
    # Upper bounds (2**40) from the decode pool: beyond them every image would fail (the job header's
    # 64-bit fields, the workers' RLIMIT_AS), though the service would report itself healthy.
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=MAX_DECODE_LIMIT, description="Largest image (width x height) decoded."
    )
    max_decode_bytes: int = Field(
        DEFAULT_MAX_DECODE_BYTES,
        ge=1,
        le=MAX_DECODE_LIMIT,
        description="Largest decode: pixels x channels x bytes per sample.",
    )
    # Starlette refuses multipart bodies of over 1,000 parts itself, so more files could never arrive.
    max_batch_files: int = Field(32, ge=1, le=1000, description="Files per /predict/batch request.")
    decode_workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Decoder processes for ordinary images; unset: min(4, CPUs) with a GPU, CPUs // 8 (at least 1) "
        "on the CPU. CXR_LARGE_DECODES more decode large images.",
    )
    large_decode_bytes: int = Field(
        DEFAULT_LARGE_DECODE_BYTES,
        ge=1,
        le=MAX_DECODE_LIMIT,
        description="Decodes costing more use the CXR_LARGE_DECODES workers.",
    )
    large_decodes: int = Field(1, ge=1, le=64, description="Decoder processes for large images (at once, one each).")
    # At most a day (MAX_DECODE_TIMEOUT_S), finite: the pool's wait overflows past 24.8 days, failing every image.
    decode_timeout_s: float = Field(
        DEFAULT_DECODE_TIMEOUT_S,
        gt=0,
        le=MAX_DECODE_TIMEOUT_S,
        allow_inf_nan=False,
        description="A decoder slower than this is killed.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * MiB, description="Request line and headers, in bytes (431 over)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=DAY_S, description="Time to send the request line and headers (408 after)."
    )
    body_timeout_s: float = Field(
        120.0, gt=0, le=DAY_S, description="Time to send the whole body once headers are in (408)."
    )
    api_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    graceful_shutdown_s: int = Field(30, ge=1, le=DAY_S, description="Time in-flight requests get after SIGTERM.")
    keep_alive_s: int = Field(
        75, ge=1, le=DAY_S, description="Idle keep-alive; above the load balancer's idle timeout."
    )
    retry_after_s: int = Field(1, ge=1, le=DAY_S, description="Retry-After sent with 503 responses.")
    dicom_check_modality: bool = Field(True, description="Refuse DICOM files whose Modality is not CR, DX or DR.")
    dicom_check_view_position: bool = Field(True, description="Refuse DICOM lateral and oblique views.")
    dicom_check_presentation_intent: bool = Field(True, description="Refuse DICOM FOR PROCESSING (raw) images.")

    def dicom_policy(self) -> DicomPolicy:
        """The DICOM metadata checks as the plain value preprocessing takes (it may run in another process)."""
        return DicomPolicy(
            check_modality=self.dicom_check_modality,
            check_view_position=self.dicom_check_view_position,
            check_presentation_intent=self.dicom_check_presentation_intent,
        )

    ui: bool = Field(True, description="Serve the web page at /ui (CXR_UI=off removes it; / then goes to /docs).")

    def api_key_accepts(self, supplied: str | None) -> bool:
        """True when no key is configured or ``supplied`` is it; constant-time, so timing leaks nothing."""
        if self.api_key is None:
            return True
        return supplied is not None and secrets.compare_digest(
            supplied.encode(), self.api_key.get_secret_value().encode()
        )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """Accept ``https://a.org,https://b.org``, the natural way to write a list in one variable."""
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("cache_dir", "max_wait_ms", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """``CXR_CACHE_DIR=off`` (or empty) turns the cache off; an empty ``CXR_MAX_WAIT_MS`` means the default."""
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
            return None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("api_key", "decode_workers", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        """``CXR_API_KEY=`` (set but empty) means no key, never "the empty string is the key"; an empty
        ``CXR_DECODE_WORKERS`` (docker compose passes an unset one so) means the device's default."""
        return None if isinstance(value, str) and not value.strip() else value


def load_settings() -> Settings:
    """Read the environment; raise :class:`SettingsError` with a one-line reason when it is invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        raise SettingsError(f"invalid setting CXR_{where.split('.')[0].upper()}: {message}") from exc
