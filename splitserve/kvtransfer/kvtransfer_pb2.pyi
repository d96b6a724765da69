from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayoutFingerprint(_message.Message):
    __slots__ = ("model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "layout")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    layout: LayoutFingerprint
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., layout: _Optional[_Union[LayoutFingerprint, _Mapping]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("num_blocks", "num_free_blocks")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    num_free_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ...) -> None: ...

class TransferHeader(_message.Message):
    __slots__ = ("request_id", "layout", "kv_codec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KV_CODEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: LayoutFingerprint
    kv_codec: str
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[LayoutFingerprint, _Mapping]] = ..., kv_codec: _Optional[str] = ...) -> None: ...

class Grow(_message.Message):
    __slots__ = ("num_tokens",)
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    def __init__(self, num_tokens: _Optional[int] = ...) -> None: ...

class RequestSnapshot(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "num_computed_tokens", "sampling_params_json", "text_state_json", "text_emitted", "spec_acceptance")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_STATE_JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMITTED_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    sampling_params_json: str
    text_state_json: str
    text_emitted: int
    spec_acceptance: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., sampling_params_json: _Optional[str] = ..., text_state_json: _Optional[str] = ..., text_emitted: _Optional[int] = ..., spec_acceptance: _Optional[float] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("layer", "first_block", "num_blocks", "data", "crc32c")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    layer: int
    first_block: int
    num_blocks: int
    data: bytes
    crc32c: int
    def __init__(self, layer: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("num_chunks", "num_bytes", "snapshot")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    num_bytes: int
    snapshot: RequestSnapshot
    def __init__(self, num_chunks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., snapshot: _Optional[_Union[RequestSnapshot, _Mapping]] = ...) -> None: ...

class TransferMessage(_message.Message):
    __slots__ = ("header", "chunk", "commit", "grow")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    GROW_FIELD_NUMBER: _ClassVar[int]
    header: TransferHeader
    chunk: TensorChunk
    commit: Commit
    grow: Grow
    def __init__(self, header: _Optional[_Union[TransferHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., grow: _Optional[_Union[Grow, _Mapping]] = ...) -> None: ...

class TransferAck(_message.Message):
    __slots__ = ("num_bytes", "num_chunks")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    num_chunks: int
    def __init__(self, num_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
