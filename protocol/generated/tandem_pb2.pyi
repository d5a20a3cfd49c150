from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT8: DType
INT64: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scale")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("protocol_version", "model_fingerprint", "edge_bottom_blocks", "edge_top_blocks", "wire_dtype_up", "wire_dtype_down", "lora_targets", "lora_blocks", "carried_lora", "lora_rank", "lora_scaling", "carried_method", "feedforward_targets", "branch_on_output", "prefix_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EDGE_BOTTOM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EDGE_TOP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_UP_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_DOWN_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LORA_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CARRIED_LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_SCALING_FIELD_NUMBER: _ClassVar[int]
    CARRIED_METHOD_FIELD_NUMBER: _ClassVar[int]
    FEEDFORWARD_TARGETS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ON_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_fingerprint: str
    edge_bottom_blocks: int
    edge_top_blocks: int
    wire_dtype_up: DType
    wire_dtype_down: DType
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    lora_blocks: _containers.RepeatedScalarFieldContainer[int]
    carried_lora: bool
    lora_rank: int
    lora_scaling: float
    carried_method: str
    feedforward_targets: _containers.RepeatedScalarFieldContainer[str]
    branch_on_output: bool
    prefix_tokens: int
    def __init__(self, protocol_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., edge_bottom_blocks: _Optional[int] = ..., edge_top_blocks: _Optional[int] = ..., wire_dtype_up: _Optional[_Union[DType, str]] = ..., wire_dtype_down: _Optional[_Union[DType, str]] = ..., lora_targets: _Optional[_Iterable[str]] = ..., lora_blocks: _Optional[_Iterable[int]] = ..., carried_lora: _Optional[bool] = ..., lora_rank: _Optional[int] = ..., lora_scaling: _Optional[float] = ..., carried_method: _Optional[str] = ..., feedforward_targets: _Optional[_Iterable[str]] = ..., branch_on_output: _Optional[bool] = ..., prefix_tokens: _Optional[int] = ...) -> None: ...

class SiteWeights(_message.Message):
    __slots__ = ("block", "target", "a", "b", "magnitude", "scale", "prefix_key", "prefix_value")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    MAGNITUDE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_VALUE_FIELD_NUMBER: _ClassVar[int]
    block: int
    target: str
    a: Tensor
    b: Tensor
    magnitude: Tensor
    scale: Tensor
    prefix_key: Tensor
    prefix_value: Tensor
    def __init__(self, block: _Optional[int] = ..., target: _Optional[str] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ..., magnitude: _Optional[_Union[Tensor, _Mapping]] = ..., scale: _Optional[_Union[Tensor, _Mapping]] = ..., prefix_key: _Optional[_Union[Tensor, _Mapping]] = ..., prefix_value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "first_cloud_block", "last_cloud_block", "hidden_size", "max_tokens_per_step", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_CLOUD_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LAST_CLOUD_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    first_cloud_block: int
    last_cloud_block: int
    hidden_size: int
    max_tokens_per_step: int
    ttl_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., first_cloud_block: _Optional[int] = ..., last_cloud_block: _Optional[int] = ..., hidden_size: _Optional[int] = ..., max_tokens_per_step: _Optional[int] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "steps", "bytes_received", "bytes_sent", "cloud_compute_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    CLOUD_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    steps: int
    bytes_received: int
    bytes_sent: int
    cloud_compute_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., steps: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., cloud_compute_seconds: _Optional[float] = ...) -> None: ...

class Begin(_message.Message):
    __slots__ = ("session_id", "step", "train", "hidden", "attention_mask", "active_blocks", "lora_weights")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LORA_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    train: bool
    hidden: Tensor
    attention_mask: Tensor
    active_blocks: _containers.RepeatedScalarFieldContainer[int]
    lora_weights: _containers.RepeatedCompositeFieldContainer[SiteWeights]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., train: _Optional[bool] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., active_blocks: _Optional[_Iterable[int]] = ..., lora_weights: _Optional[_Iterable[_Union[SiteWeights, _Mapping]]] = ...) -> None: ...

class LoraRequest(_message.Message):
    __slots__ = ("block", "x", "group")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    block: int
    x: Tensor
    group: str
    def __init__(self, block: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., group: _Optional[str] = ...) -> None: ...

class LoraReply(_message.Message):
    __slots__ = ("block", "outputs", "group")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    block: int
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    group: str
    def __init__(self, block: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., group: _Optional[str] = ...) -> None: ...

class Hidden(_message.Message):
    __slots__ = ("hidden", "cloud_seconds")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CLOUD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    cloud_seconds: float
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., cloud_seconds: _Optional[float] = ...) -> None: ...

class OutputGrad(_message.Message):
    __slots__ = ("grad",)
    GRAD_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LoraGradRequest(_message.Message):
    __slots__ = ("block", "grads", "group")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    block: int
    grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    group: str
    def __init__(self, block: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., group: _Optional[str] = ...) -> None: ...

class LoraGradReply(_message.Message):
    __slots__ = ("block", "grad", "group")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    block: int
    grad: Tensor
    group: str
    def __init__(self, block: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., group: _Optional[str] = ...) -> None: ...

class InputGrad(_message.Message):
    __slots__ = ("grad", "cloud_seconds", "lora_grads")
    GRAD_FIELD_NUMBER: _ClassVar[int]
    CLOUD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LORA_GRADS_FIELD_NUMBER: _ClassVar[int]
    grad: Tensor
    cloud_seconds: float
    lora_grads: _containers.RepeatedCompositeFieldContainer[SiteWeights]
    def __init__(self, grad: _Optional[_Union[Tensor, _Mapping]] = ..., cloud_seconds: _Optional[float] = ..., lora_grads: _Optional[_Iterable[_Union[SiteWeights, _Mapping]]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("begin", "lora_reply", "output_grad", "lora_grad_reply")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    LORA_REPLY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    LORA_GRAD_REPLY_FIELD_NUMBER: _ClassVar[int]
    begin: Begin
    lora_reply: LoraReply
    output_grad: OutputGrad
    lora_grad_reply: LoraGradReply
    def __init__(self, begin: _Optional[_Union[Begin, _Mapping]] = ..., lora_reply: _Optional[_Union[LoraReply, _Mapping]] = ..., output_grad: _Optional[_Union[OutputGrad, _Mapping]] = ..., lora_grad_reply: _Optional[_Union[LoraGradReply, _Mapping]] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("lora_request", "hidden", "lora_grad_request", "input_grad")
    LORA_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LORA_GRAD_REQUEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    lora_request: LoraRequest
    hidden: Hidden
    lora_grad_request: LoraGradRequest
    input_grad: InputGrad
    def __init__(self, lora_request: _Optional[_Union[LoraRequest, _Mapping]] = ..., hidden: _Optional[_Union[Hidden, _Mapping]] = ..., lora_grad_request: _Optional[_Union[LoraGradRequest, _Mapping]] = ..., input_grad: _Optional[_Union[InputGrad, _Mapping]] = ...) -> None: ...
