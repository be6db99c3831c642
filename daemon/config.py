"""The YAML config: parsed into pydantic models, with errors that name the line.

Everything the daemon does is derived from one `Config`; the supervisor diffs two of them
to decide what to start, stop or leave alone, so every field here must compare by value.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      WithJsonSchema, model_validator)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from `123`, `"512MB"`, `"2GiB"`, so budgets read naturally in YAML."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MB or 2GiB")
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 512MB or 2GiB, got {value!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    return int(float(m.group(1)) * _UNITS[unit])


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    Field(ge=0),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                              {"type": "string", "pattern": _SIZE.pattern}]}),
]


_SECRET_REF = re.compile(r"^\$\{(env|file):([^}]+)\}$")


def resolve_secret(value: str) -> str:
    """`${env:VAR}` or `${file:PATH}` so keys need not sit in the YAML itself."""
    m = _SECRET_REF.match(value)
    if not m:
        return value
    kind, ref = m.groups()
    if kind == "env":
        if not os.environ.get(ref):
            raise ValueError(f"environment variable {ref} is not set")
        return os.environ[ref]
    path = Path(ref).expanduser()
    try:
        secret = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read key file {path}: {e.strerror or e}") from None
    if not secret:
        raise ValueError(f"key file {path} is empty")
    return secret


Secret = Annotated[str, Field(min_length=1), AfterValidator(resolve_secret)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Strict):
    """Defaults applied when a request does not say."""

    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1, description="Default max_tokens for a request that sets none.")


class Speculative(_Strict):
    """Prompt-lookup speculative decoding: drafts copied from the request's own prompt and output."""

    mode: Literal["prompt_lookup"] = Field(description="prompt_lookup: no draft model, drafts from the context.")
    max_draft: int = Field(8, ge=1, le=32, description="Draft tokens verified per step at most.")
    max_sequences: int = Field(1, ge=1, description=(
        "Draft while at most this many sequences decode together; beyond, they decode a token a step. "
        "On a CPU a batch's wider verify pass (and realigning its rows' caches) costs more than it saves."))
    ngram: tuple[int, int] = Field((2, 16), description="[min, max] length of the context's tail looked up "
                                                        "earlier in it (longest first, most recent match).")

    @model_validator(mode="after")
    def _ngram_order(self):
        lo, hi = self.ngram
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram must be [min, max] with 1 <= min <= max, got [{lo}, {hi}]")
        return self


class Engine(_Strict):
    """The worker's batching; a change needs a new worker process, except max_waiting (enforced by the daemon)."""

    max_batch_size: int = Field(8, ge=1, le=256, description="Requests decoded together.")
    prefill_batch_size: int = Field(4, ge=1, le=64, description="Prompts prefilled together.")
    prefill_step_size: int = Field(512, ge=16, description="Tokens per prefill chunk; smaller keeps decode of others smooth.")
    context_length: Optional[int] = Field(None, ge=16, description=("Max prompt + completion tokens. Default: the longest that max_batch_size requests fit in "
        "server.memory_budget (or the machine's memory) beside the weights and the prefix cache, at most the model's own; "
        "logged at start. A value set here is kept whatever it costs."))
    max_waiting: int = Field(64, ge=0, description="Requests queued beyond max_batch_size before new ones get 429.")
    speculative: Optional[Speculative] = Field(None, description="Speculative decoding; null (default): off.")


class PrefixCache(_Strict):
    enabled: bool = True
    memory_budget: Size = parse_size("1GiB")
    disk_budget: Size = parse_size("8GiB")
    kv_bits: Optional[Literal[4, 8]] = Field(None, description="Quantize stored KV entries; null keeps them exact.")
    write_buffer: Size = Field(parse_size("512MiB"), description=(
        "KV bytes waiting for the disk writer at most; past it a finished request's entry is not written "
        "(counted as dropped_writes), so a slow disk never holds more memory than this."))
    checkpoint_every: int = Field(2048, ge=64, le=1 << 20, description=(
        "For models whose cache cannot be trimmed (sliding windows, recurrent state): keep a snapshot every "
        "this many tokens of a long prefill, so a prompt that diverges deep inside a cached one re-prefills "
        "at most this many tokens. Each costs one snapshot of the cache in the budgets."))
    block_tokens: int = Field(256, ge=32, le=1 << 16, multiple_of=32, description=(
        "Tokens per stored KV block. Entries sharing a prefix share its blocks, so a finer block shares more of "
        "a partly shared prefix; a coarser one restores with fewer pieces. A multiple of 32."))
    share_across_keys: bool = Field(False, description=(
        "With server.auth.api_keys set, requests of different keys reuse each other's cached prefixes. "
        "Off (default): each key's entries are its own, so no key learns another's prompts from "
        "cached_tokens. Applies live."))


class Embedding(_Strict):
    """How an embedding model answers; pooling, normalisation and window come from its directory."""

    truncate: bool = Field(False, description=(
        "Cut inputs longer than the model's window to fit; false (default): such an input is a 400 naming it. "
        "Ollama's /api/embed asks per request (its `truncate`, true by default)."))
    allow_dimensions: bool = Field(False, description=(
        "Accept `dimensions` (truncate and renormalise) for a model not trained for it (Matryoshka); "
        "its shorter vectors then lose quality."))
    batch_tokens: Optional[int] = Field(None, ge=16, description=(
        "Tokens (padded) in one forward pass at most; inputs of all waiting requests are grouped by length. "
        "Default: 2048 on a CPU device (less padding and a cache-sized attention: about a fifth fewer "
        "CPU-seconds than 8192 on 16-256-token inputs), 8192 on a GPU."))
    max_seq_length: Optional[int] = Field(None, ge=2, description="The window in tokens; default: the model's.")
    pooling: Optional[Literal["mean", "cls", "last"]] = Field(None, description=(
        "Default: the sentence-transformers directory's, else last token for decoder models and mean for encoders."))
    normalize: Optional[bool] = Field(None, description="Unit-length vectors; default: the directory's (true without one).")


def _ip(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address (the ring backend connects ranks by IP)") from None


class Distributed(_Strict):
    """One model served by a pipeline of ranks: rank i runs on hosts[i]; rank 0 is this daemon's worker."""

    hosts: tuple[Annotated[str, AfterValidator(_ip)], ...] = Field(min_length=2, description=(
        "One IP address per rank; hosts[0] is this machine (rank 0 talks to the daemon). Other "
        "addresses of this machine start a local process, remote ones are started over ssh."))
    backend: Literal["ring", "jaccl"] = Field("ring", description="MLX distributed backend; jaccl (RDMA over Thunderbolt) is macOS only.")
    split: Optional[tuple[Annotated[int, Field(gt=0)], ...]] = Field(None, description=(
        "Layers per rank, in rank order; default: an even split. Rank 0 runs the last layers."))

    rdma: Optional[tuple[tuple[Optional[str], ...], ...]] = Field(None, description=(
        "jaccl only: rdma[i][j] is the RDMA device rank i reaches rank j through (null for i == j), "
        "as in the hostfile `mlx.distributed_config --backend jaccl --auto-setup` writes."))

    @model_validator(mode="after")
    def _consistent(self) -> "Distributed":
        n = len(self.hosts)
        if self.split is not None and len(self.split) != n:
            raise ValueError(f"split has {len(self.split)} entries for {n} hosts; give one per rank")
        if self.backend == "jaccl" and sys.platform != "darwin":
            raise ValueError("backend jaccl needs macOS (RDMA over Thunderbolt); use ring on this platform")
        if self.backend == "jaccl":
            rows = self.rdma or ()
            if len(rows) != n or any(len(r) != n for r in rows):
                raise ValueError(f"backend jaccl needs rdma: {n} rows of {n} RDMA device names, one per pair of ranks")
            if any(rows[i][j] is None for i in range(n) for j in range(n) if i != j) or any(rows[i][i] for i in range(n)):
                raise ValueError("rdma[i][j] names the device from rank i to rank j, and is null only where i == j")
        elif self.rdma is not None:
            raise ValueError("rdma is for backend jaccl only")
        return self


def _tool_parsers() -> Optional[set[str]]:
    """mlx-lm's tool parser modules, listed without importing mlx-lm (the daemon never loads MLX)."""
    import importlib.util

    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tool_parsers"
    return {p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}


def _check_tool_parser(v: Optional[str]) -> Optional[str]:
    known = _tool_parsers()
    if v is not None and v != "hermes" and known is not None and v not in known:
        raise ValueError(f"unknown tool parser {v!r}; expected hermes or one of mlx-lm's: {', '.join(sorted(known))}")
    return v


def _check_template(v: Optional[Path]) -> Optional[Path]:
    if v is not None and not Path(v).expanduser().is_file():
        raise ValueError(f"chat template file {v} does not exist")
    return v


class ModelConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", description="The id clients send as `model`.")
    source: str = Field(description="embedded:smollm2, embedded:gemma3-270m or embedded:all-minilm-l6-v2 (embeddings), a .gguf file, a local MLX directory, a Hugging Face repo id in the local HF cache, ollama:NAME[:TAG] or lmstudio:PUBLISHER/MODEL (`mlxd models` lists them).")
    aliases: tuple[str, ...] = ()
    dtype: Literal["auto", "float32", "float16", "bfloat16", "quantized"] = Field(
        "auto", description="auto: quantized on Metal, float32 on a CPU device.")
    engine: Engine = Engine()
    sampling: Sampling = Sampling()
    prefix_cache: PrefixCache = PrefixCache()
    preload: bool = Field(True, description="Start with the daemon; false loads at the first request.")
    idle_ttl: Optional[float] = Field(None, gt=0, description="Seconds without requests after which the worker is stopped.")
    pinned: bool = Field(False, description="Never stopped by idle_ttl or the memory budget.")
    chat_template: Annotated[Optional[Path], AfterValidator(_check_template)] = Field(
        None, description="A Jinja chat template file replacing the tokenizer's.")
    tool_parser: Annotated[Optional[str], AfterValidator(_check_tool_parser)] = Field(
        None, description="Tool-call format when the tokenizer declares none: hermes, or an mlx-lm parser "
                          "(json_tools, qwen3_coder, glm47, mistral, pythonic, ...).")
    reasoning_parser: Optional[Literal["think", "none"]] = Field(
        None, description="think: <think>...</think> is reasoning even if the vocabulary lacks those tokens; "
                          "none: no reasoning parsing. Default: what mlx-lm infers from the vocabulary.")
    distributed: Optional[Distributed] = Field(None, description=(
        "Serve this model from a pipeline-parallel group of processes over MLX distributed; "
        "each rank holds only its layers."))
    kind: Optional[Literal["chat", "embedding"]] = Field(None, description=(
        "embedding: serve /v1/embeddings (and Ollama's /api/embed) instead of generating. Default: detected "
        "from the directory (a sentence-transformers model is an embedding model)."))
    embedding: Embedding = Embedding()
    # The template file's content when this config was read: editing the file in place is a
    # change of the entry (the worker renders with it), like editing the YAML.
    _template_digest: Optional[str] = PrivateAttr(None)

    @model_validator(mode="after")
    def _group_engine(self) -> "ModelConfig":
        if self.distributed is not None and self.engine.speculative is not None:
            # Every rank would have to run the same drafts and rollbacks: not broadcast yet.
            raise ValueError("engine.speculative is not supported with distributed yet; remove one of them")
        if self.distributed is not None and self.kind == "embedding":
            raise ValueError("an embedding model cannot be distributed; remove one of kind or distributed")
        return self

    def model_post_init(self, _context: Any) -> None:
        if self.chat_template is not None:
            data = Path(self.chat_template).expanduser().read_bytes()
            self._template_digest = hashlib.sha256(data).hexdigest()

    def worker_key(self) -> str:
        """What a running worker depends on; a change to anything else applies live."""
        key = self.model_dump(mode="json", include={
            "source", "dtype", "engine", "prefix_cache", "chat_template", "tool_parser", "reasoning_parser",
            "distributed", "kind", "embedding"})
        del key["engine"]["max_waiting"]       # enforced in the daemon: a change applies live
        del key["prefix_cache"]["share_across_keys"]   # the daemon names each request's namespace
        key["chat_template_sha256"] = self._template_digest
        return json.dumps(key, sort_keys=True)


def default_cache_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlxd"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxd"


class Auth(_Strict):
    api_keys: tuple[Secret, ...] = Field((), description="Accepted bearer keys; literal, ${env:VAR} or ${file:PATH}. Empty: no auth.")
    protect_metrics: bool = Field(False, description="Require a key for /metrics too.")


class RateLimit(_Strict):
    """Per API key (per client address when there are no keys); token buckets refilled per minute."""

    requests_per_minute: Optional[int] = Field(None, ge=1)
    tokens_per_minute: Optional[int] = Field(None, ge=1, description="Prompt + generated tokens.")


def _origin(v: str) -> str:
    """`*`, or a web origin as browsers send it: scheme://host[:port], nothing after."""
    from urllib.parse import urlsplit

    if v == "*":
        return v
    parts = urlsplit(v.strip().lower())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{v!r} is not a web origin; expected scheme://host[:port] such as "
                         "http://localhost:3000, or \"*\"")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class Server(_Strict):
    """Applied live at a reload, except host and port (a restart of mlxd) and cache_dir (new workers)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    cache_dir: Optional[Path] = Field(None, description="Converted models and prefix caches; default follows platform conventions.")
    worker_start_timeout: float = Field(600.0, gt=0, description="Seconds a worker may take to load its model.")
    drain_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests of a removed or replaced model may take to finish.")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests may take to finish when the daemon stops.")
    memory_budget: Optional[Size] = Field(None, description="Memory all workers may use; least-recently-used idle models are stopped to make room.")
    auth: Auth = Auth()
    allowed_origins: tuple[Annotated[str, AfterValidator(_origin)], ...] = Field((), description=(
        "Web origins (scheme://host[:port]) whose pages may call mlxd from a browser and read the answers "
        "(CORS). Empty (default): only the console's own page. \"*\" lets every web page in (logged as a warning)."))
    rate_limit: RateLimit = RateLimit()
    max_body_bytes: Size = parse_size("8MiB")
    request_timeout: Optional[float] = Field(900.0, gt=0, description="Seconds a request may take in all; null: no limit.")
    worker_hang_timeout: float = Field(120.0, gt=0, description="A worker silent this long (no step, no stats) is restarted.")
    worker_stop_timeout: float = Field(60.0, gt=0, description="Seconds a stopping worker may take to flush its prefix cache before it is killed.")
    console: bool = Field(True, description="Serve the web console at / and /ui/ (the model actions API stays on).")
    cache_disk_budget: Optional[Size] = Field(None, description=(
        "Disk all prefix caches may use together (every model's namespace under cache_dir/prefix); "
        "the least recently used entries of any namespace go first. Null: only each model's disk_budget."))
    cache_orphan_ttl: float = Field(7 * 86400.0, gt=0, description=(
        "Seconds after which the prefix cache of a model no worker uses any more is removed."))
    drop_system_prefixes: tuple[str, ...] = Field(
        ("x-anthropic-billing-header:",),
        description="System-prompt lines (Messages system blocks, Responses instructions) starting with one of these "
                    "are dropped before templating: agents put a per-session id there, which would defeat the prefix cache.")
    responses_store: int = Field(256, ge=0, description="Recent /v1/responses kept in memory for previous_response_id.")
    stream_ping_seconds: float = Field(5.0, gt=0, description="A stream silent this long (a long prefill) gets a keep-alive: "
                                                             "an SSE comment, or `event: ping` on /v1/messages.")
    stream_write_timeout: Optional[float] = Field(30.0, gt=0, description=(
        "Seconds a response chunk may wait for the client to take it; past it the response is cut off, its request "
        "cancelled and its slot freed (a client that stops reading cannot hold a model). Null: no limit."))

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


class Config(_Strict):
    server: Server = Server()
    models: tuple[ModelConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        seen: dict[str, str] = {}
        for i, m in enumerate(self.models):
            for n in (m.name, *m.aliases):
                if n in seen:
                    raise ValueError(f"models[{i}]: name or alias {n!r} is already used by model {seen[n]!r}")
                seen[n] = m.name
        return self


class ConfigError(Exception):
    """A config that cannot be used; the message names file, line and field."""


def _line_of(node: yaml.Node | None, loc: tuple) -> Optional[int]:
    """Walk the composed YAML tree along a pydantic error location to find its line."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _describe(loc: tuple, data: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        try:
            out += f" (model {data['models'][loc[1]]['name']!r})"
        except (KeyError, IndexError, TypeError):
            pass
    return out


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a `models:` list, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        lines = []
        for err in errors:
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            if err["type"] == "too_short" and any(o["loc"][: len(loc)] == loc and o is not err for o in errors):
                continue  # "models is empty" only because its items failed: noise
            msg = err["msg"].removeprefix("Value error, ")
            if not loc and (m := re.match(r"models\[(\d+)\]: ", msg)):
                loc, msg = ("models", int(m.group(1))), msg[m.end():]
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {_describe(loc, data) or 'config'}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    return parse_config(text, str(path))


def json_schema() -> dict:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mlxd config"
    return schema
