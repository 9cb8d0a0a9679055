from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVReturn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_RETURN_UNSPECIFIED: _ClassVar[KVReturn]
    KV_RETURN_NONE: _ClassVar[KVReturn]
    KV_RETURN_HANDLE: _ClassVar[KVReturn]
    KV_RETURN_INLINE: _ClassVar[KVReturn]

class LogitsReturn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGITS_RETURN_UNSPECIFIED: _ClassVar[LogitsReturn]
    LOGITS_RETURN_NONE: _ClassVar[LogitsReturn]
    LOGITS_RETURN_LAST: _ClassVar[LogitsReturn]
    LOGITS_RETURN_ALL: _ClassVar[LogitsReturn]
    LOGITS_RETURN_POSITIONS: _ClassVar[LogitsReturn]

class AttentionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_MODE_UNSPECIFIED: _ClassVar[AttentionMode]
    ATTENTION_MODE_PROXY: _ClassVar[AttentionMode]
    ATTENTION_MODE_DENSE: _ClassVar[AttentionMode]

class KVTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KVTransport]
    KV_TRANSPORT_SHARED_MEMORY: _ClassVar[KVTransport]
    KV_TRANSPORT_CUDA_IPC: _ClassVar[KVTransport]
KV_RETURN_UNSPECIFIED: KVReturn
KV_RETURN_NONE: KVReturn
KV_RETURN_HANDLE: KVReturn
KV_RETURN_INLINE: KVReturn
LOGITS_RETURN_UNSPECIFIED: LogitsReturn
LOGITS_RETURN_NONE: LogitsReturn
LOGITS_RETURN_LAST: LogitsReturn
LOGITS_RETURN_ALL: LogitsReturn
LOGITS_RETURN_POSITIONS: LogitsReturn
ATTENTION_MODE_UNSPECIFIED: AttentionMode
ATTENTION_MODE_PROXY: AttentionMode
ATTENTION_MODE_DENSE: AttentionMode
KV_TRANSPORT_UNSPECIFIED: KVTransport
KV_TRANSPORT_SHARED_MEMORY: KVTransport
KV_TRANSPORT_CUDA_IPC: KVTransport

class TokenIds(_message.Message):
    __slots__ = ("ids", "packed_int32")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_INT32_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    packed_int32: bytes
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., packed_int32: _Optional[bytes] = ...) -> None: ...

class ReturnOptions(_message.Message):
    __slots__ = ("kv", "logits", "logit_positions", "lease_seconds", "include_token_ids")
    KV_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    kv: KVReturn
    logits: LogitsReturn
    logit_positions: _containers.RepeatedScalarFieldContainer[int]
    lease_seconds: int
    include_token_ids: bool
    def __init__(self, kv: _Optional[_Union[KVReturn, str]] = ..., logits: _Optional[_Union[LogitsReturn, str]] = ..., logit_positions: _Optional[_Iterable[int]] = ..., lease_seconds: _Optional[int] = ..., include_token_ids: _Optional[bool] = ...) -> None: ...

class ProxyAttnSettings(_message.Message):
    __slots__ = ("mode", "gamma", "min_budget_tokens", "stride", "budget", "alpha", "exponent", "dense_below_tokens")
    MODE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    MIN_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EXPONENT_FIELD_NUMBER: _ClassVar[int]
    DENSE_BELOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: AttentionMode
    gamma: float
    min_budget_tokens: int
    stride: int
    budget: str
    alpha: float
    exponent: float
    dense_below_tokens: int
    def __init__(self, mode: _Optional[_Union[AttentionMode, str]] = ..., gamma: _Optional[float] = ..., min_budget_tokens: _Optional[int] = ..., stride: _Optional[int] = ..., budget: _Optional[str] = ..., alpha: _Optional[float] = ..., exponent: _Optional[float] = ..., dense_below_tokens: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages", "add_generation_prompt")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "text", "chat", "add_special_tokens", "returns", "chunk_size", "attention", "pipeline_stages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_STAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: TokenIds
    text: str
    chat: Chat
    add_special_tokens: bool
    returns: ReturnOptions
    chunk_size: int
    attention: ProxyAttnSettings
    pipeline_stages: int
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., add_special_tokens: _Optional[bool] = ..., returns: _Optional[_Union[ReturnOptions, _Mapping]] = ..., chunk_size: _Optional[int] = ..., attention: _Optional[_Union[ProxyAttnSettings, _Mapping]] = ..., pipeline_stages: _Optional[int] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("request_id", "num_tokens", "queue_position", "pending_tokens", "worker", "pipeline_stages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_STAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    queue_position: int
    pending_tokens: int
    worker: str
    pipeline_stages: int
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., queue_position: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., worker: _Optional[str] = ..., pipeline_stages: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("tokens_done", "total_tokens")
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens_done: int
    total_tokens: int
    def __init__(self, tokens_done: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class Logits(_message.Message):
    __slots__ = ("positions", "dtype", "shape", "data")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, positions: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "layout", "rope_theta", "rope_scaling_json", "num_tokens", "token_sha256", "format_version", "last_token_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_FIELD_NUMBER: _ClassVar[int]
    ROPE_SCALING_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: str
    rope_theta: float
    rope_scaling_json: str
    num_tokens: int
    token_sha256: str
    format_version: int
    last_token_id: int
    def __init__(self, model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., rope_theta: _Optional[float] = ..., rope_scaling_json: _Optional[str] = ..., num_tokens: _Optional[int] = ..., token_sha256: _Optional[str] = ..., format_version: _Optional[int] = ..., last_token_id: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "layer", "token_start", "token_end", "dtype", "shape", "keys", "values", "token_ids")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    layer: int
    token_start: int
    token_end: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    keys: bytes
    values: bytes
    token_ids: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., layer: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ..., token_ids: _Optional[bytes] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("handle", "expires_at_unix_ms", "kv_bytes", "header", "worker")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    handle: str
    expires_at_unix_ms: int
    kv_bytes: int
    header: KVHeader
    worker: str
    def __init__(self, handle: _Optional[str] = ..., expires_at_unix_ms: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., header: _Optional[_Union[KVHeader, _Mapping]] = ..., worker: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "prefill_seconds", "estimate_seconds", "attention_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    prefill_seconds: float
    estimate_seconds: float
    attention_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., estimate_seconds: _Optional[float] = ..., attention_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("request_id", "num_tokens", "sparsity", "layer_sparsity", "timings", "kv_bytes", "peak_memory_bytes", "tokens_per_second", "attention_mode", "profile")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    LAYER_SPARSITY_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MODE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    sparsity: float
    layer_sparsity: _containers.RepeatedScalarFieldContainer[float]
    timings: Timings
    kv_bytes: int
    peak_memory_bytes: int
    tokens_per_second: float
    attention_mode: str
    profile: str
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., sparsity: _Optional[float] = ..., layer_sparsity: _Optional[_Iterable[float]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., attention_mode: _Optional[str] = ..., profile: _Optional[str] = ...) -> None: ...

class PrefillEvent(_message.Message):
    __slots__ = ("accepted", "progress", "logits", "kv_chunk", "kv_handle", "summary")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNK_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: Progress
    logits: Logits
    kv_chunk: KVChunk
    kv_handle: KVHandle
    summary: Summary
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., logits: _Optional[_Union[Logits, _Mapping]] = ..., kv_chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., kv_handle: _Optional[_Union[KVHandle, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class FetchKVRequest(_message.Message):
    __slots__ = ("handle", "max_chunk_bytes", "layer_start", "layer_end", "include_token_ids")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    max_chunk_bytes: int
    layer_start: int
    layer_end: int
    include_token_ids: bool
    def __init__(self, handle: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., include_token_ids: _Optional[bool] = ...) -> None: ...

class MapKVRequest(_message.Message):
    __slots__ = ("handle", "transport", "consumer")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    handle: str
    transport: KVTransport
    consumer: ConsumerProcess
    def __init__(self, handle: _Optional[str] = ..., transport: _Optional[_Union[KVTransport, str]] = ..., consumer: _Optional[_Union[ConsumerProcess, _Mapping]] = ...) -> None: ...

class ConsumerProcess(_message.Message):
    __slots__ = ("pid", "start_ticks", "pid_namespace")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TICKS_FIELD_NUMBER: _ClassVar[int]
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_ticks: int
    pid_namespace: int
    def __init__(self, pid: _Optional[int] = ..., start_ticks: _Optional[int] = ..., pid_namespace: _Optional[int] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("shape", "stride", "offset_bytes", "cuda_ipc_handle", "cuda_storage_bytes", "cuda_storage_offset_bytes", "storage_offset", "cuda_device", "cuda_ref_counter_handle", "cuda_ref_counter_offset", "cuda_event_handle", "cuda_event_sync_required")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUDA_STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICE_FIELD_NUMBER: _ClassVar[int]
    CUDA_REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CUDA_EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    offset_bytes: int
    cuda_ipc_handle: bytes
    cuda_storage_bytes: int
    cuda_storage_offset_bytes: int
    storage_offset: int
    cuda_device: int
    cuda_ref_counter_handle: bytes
    cuda_ref_counter_offset: int
    cuda_event_handle: bytes
    cuda_event_sync_required: bool
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., offset_bytes: _Optional[int] = ..., cuda_ipc_handle: _Optional[bytes] = ..., cuda_storage_bytes: _Optional[int] = ..., cuda_storage_offset_bytes: _Optional[int] = ..., storage_offset: _Optional[int] = ..., cuda_device: _Optional[int] = ..., cuda_ref_counter_handle: _Optional[bytes] = ..., cuda_ref_counter_offset: _Optional[int] = ..., cuda_event_handle: _Optional[bytes] = ..., cuda_event_sync_required: _Optional[bool] = ...) -> None: ...

class KVMapping(_message.Message):
    __slots__ = ("header", "transport", "host_id", "shm_name", "shm_bytes", "keys", "values", "token_ids")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    transport: KVTransport
    host_id: str
    shm_name: str
    shm_bytes: int
    keys: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    values: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    token_ids: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., transport: _Optional[_Union[KVTransport, str]] = ..., host_id: _Optional[str] = ..., shm_name: _Optional[str] = ..., shm_bytes: _Optional[int] = ..., keys: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ..., values: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ..., token_ids: _Optional[bytes] = ...) -> None: ...

class PushKVRequest(_message.Message):
    __slots__ = ("handle", "rendezvous", "backend", "transfer_id", "timeout_seconds")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    rendezvous: str
    backend: str
    transfer_id: str
    timeout_seconds: int
    def __init__(self, handle: _Optional[str] = ..., rendezvous: _Optional[str] = ..., backend: _Optional[str] = ..., transfer_id: _Optional[str] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("header", "bytes_sent", "seconds")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    bytes_sent: int
    seconds: float
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., bytes_sent: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("handle", "lease_seconds")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    lease_seconds: int
    def __init__(self, handle: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class LeaseInfo(_message.Message):
    __slots__ = ("handle", "expires_at_unix_ms", "kv_bytes", "num_tokens")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    expires_at_unix_ms: int
    kv_bytes: int
    num_tokens: int
    def __init__(self, handle: _Optional[str] = ..., expires_at_unix_ms: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ReleaseKVRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseKVResponse(_message.Message):
    __slots__ = ("released_bytes",)
    RELEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    released_bytes: int
    def __init__(self, released_bytes: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_prompt_tokens", "max_pending_tokens", "default_chunk_size", "min_chunk_size", "max_chunk_size", "default_lease_seconds", "max_lease_seconds", "kv_memory_cap_bytes", "max_kv_chunk_bytes", "max_logit_positions", "min_gamma", "min_budget_tokens_floor", "allowed_strides", "default_attention_mode", "max_pipeline_stages", "shard_above_tokens")
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_CAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGIT_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_GAMMA_FIELD_NUMBER: _ClassVar[int]
    MIN_BUDGET_TOKENS_FLOOR_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_STRIDES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ATTENTION_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_PIPELINE_STAGES_FIELD_NUMBER: _ClassVar[int]
    SHARD_ABOVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_prompt_tokens: int
    max_pending_tokens: int
    default_chunk_size: int
    min_chunk_size: int
    max_chunk_size: int
    default_lease_seconds: int
    max_lease_seconds: int
    kv_memory_cap_bytes: int
    max_kv_chunk_bytes: int
    max_logit_positions: int
    min_gamma: float
    min_budget_tokens_floor: int
    allowed_strides: _containers.RepeatedScalarFieldContainer[int]
    default_attention_mode: str
    max_pipeline_stages: int
    shard_above_tokens: int
    def __init__(self, max_prompt_tokens: _Optional[int] = ..., max_pending_tokens: _Optional[int] = ..., default_chunk_size: _Optional[int] = ..., min_chunk_size: _Optional[int] = ..., max_chunk_size: _Optional[int] = ..., default_lease_seconds: _Optional[int] = ..., max_lease_seconds: _Optional[int] = ..., kv_memory_cap_bytes: _Optional[int] = ..., max_kv_chunk_bytes: _Optional[int] = ..., max_logit_positions: _Optional[int] = ..., min_gamma: _Optional[float] = ..., min_budget_tokens_floor: _Optional[int] = ..., allowed_strides: _Optional[_Iterable[int]] = ..., default_attention_mode: _Optional[str] = ..., max_pipeline_stages: _Optional[int] = ..., shard_above_tokens: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings", "dtype", "rope_theta", "rope_scaling_json", "eos_token_ids", "limits", "num_workers", "server_version", "profile", "has_chat_template")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_FIELD_NUMBER: _ClassVar[int]
    ROPE_SCALING_JSON_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    rope_theta: float
    rope_scaling_json: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    limits: ServerLimits
    num_workers: int
    server_version: str
    profile: str
    has_chat_template: bool
    def __init__(self, model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., dtype: _Optional[str] = ..., rope_theta: _Optional[float] = ..., rope_scaling_json: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., num_workers: _Optional[int] = ..., server_version: _Optional[str] = ..., profile: _Optional[str] = ..., has_chat_template: _Optional[bool] = ...) -> None: ...
