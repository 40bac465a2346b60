"""Server configuration: flags of `msn serve`, or environment variables prefixed `MSN_`.

Flags win over the environment (they are passed as init arguments, which pydantic-settings
ranks first). Secrets (API keys) come from `MSN_API_KEYS` or a file, never from a flag, so
they do not show up in `ps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EngineName = Literal["reference", "vllm"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSN_", extra="ignore")

    # vLLM with the TR-Jacobi plugin (batched, cost-aware speculation) unless asked for the
    # reference runner (batch 1, the paper's algorithm on a transformers model).
    engine: EngineName = "vllm"
    model: str | None = Field(
        None, description="`base`, `msn`, or a local Hugging Face checkpoint; default: `msn` once "
        "its artifact is committed under models/, else `base`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Reference engine only (default cpu); vLLM takes its platform from its build.
    device: str | None = None
    # Reference engine only: its attention path (transformers' SDPA, or our paged cache
    # and Triton tree-attention kernels, cuda only) and torch.compile'd decode steps.
    reference_attention: Literal["sdpa", "paged-triton", "paged-torch"] | None = None
    reference_compile: bool | None = None
    served_model_name: str | None = Field(
        None, description="the `model` id clients send; defaults to the checkpoint folder name"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Admission: at most `max_running` generations at once, `max_queue` more waiting;
    # anything beyond gets 429 with Retry-After. None = the engine's own default
    # (1 for the batch-1 reference runner, 8 for vLLM).
    max_running: int | None = Field(None, ge=1)
    max_queue: int = Field(16, ge=0)
    retry_after_s: int = Field(1, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    graceful_shutdown_s: float = Field(30.0, ge=0)

    # Decoding method used when a request does not name one (`method` extension field).
    default_method: str | None = None

    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_prompts: bool = False
    log_level: str = "info"

    # vLLM engine only: extra AsyncEngineArgs, and the speculative config the vLLM plugin
    # (issue 6) plugs in, e.g. {"method": "custom_class", "model": "...", ...}.
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict)
    speculative_config: dict[str, Any] | None = None
    # vLLM engine: "tr-jacobi" enables our plugin (cost-aware trees) unless an explicit
    # speculative_config is given; "none" serves plain vLLM.
    vllm_speculation: Literal["tr-jacobi", "none"] = "tr-jacobi"
    # vLLM engine with the plugin: TR-Jacobi settings over the defaults
    # (proposers.vllm.TRJacobiConfig), e.g. {"corpus_tokens": 0} to keep one user's
    # outputs from drafting (and so timing) another's.
    trjacobi: dict[str, Any] = Field(default_factory=dict)

    @field_validator("api_keys", "cors_allow_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def load_api_keys(self) -> list[str]:
        """Keys from MSN_API_KEYS plus one key per non-empty line of api_key_file."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().splitlines()
            keys.extend(line.strip() for line in lines if line.strip())
        return keys
