"""One home for the Megatron checkpoint format, below both the trainer and the converters.

- ``torch_dist``: Megatron-LM's directory layout (``iter_NNNNNNN/`` or ``release/`` + tracker file), errors, and
  the safe reading of a torch_dist checkpoint (nothing in it is unpickled before it is checked);
- ``record``: the record every checkpoint carries in its common state (``CheckpointRecord`` under
  ``METADATA_KEY``);
- ``readers``: per-tensor readers of HF teacher/student directories and of Megatron checkpoints;
- ``load``: ``load_model``, a Megatron-Core model of this rank from either kind of checkpoint;
- ``save``: the in-process and streaming torch_dist save strategies.
"""

from .load import is_megatron_checkpoint, load_model
from .readers import MODEL_TYPES, LazyState, MegatronCheckpoint, StudentCheckpoint, model_config, open_hf_checkpoint
from .record import FORMAT_VERSION, METADATA_KEY, VOCAB_DIVISIBLE_BY, CheckpointLayout, CheckpointRecord, read_record
from .save import InProcessSaveStrategy, StreamingSaveStrategy
from .torch_dist import (
    RELEASE_NAME,
    TRACKER_NAME,
    CheckpointFileError,
    ConversionError,
    SafeFileSystemReader,
    load_common_state,
    read_json_object,
    resolve_megatron_dir,
    safe_torch_load,
    single_process_group,
    verify_torch_dist,
)

__all__ = [
    "FORMAT_VERSION", "METADATA_KEY", "MODEL_TYPES", "RELEASE_NAME", "TRACKER_NAME", "VOCAB_DIVISIBLE_BY",
    "CheckpointFileError", "CheckpointLayout", "CheckpointRecord", "ConversionError", "InProcessSaveStrategy",
    "LazyState", "MegatronCheckpoint", "SafeFileSystemReader", "StreamingSaveStrategy", "StudentCheckpoint",
    "is_megatron_checkpoint", "load_common_state", "load_model", "model_config", "open_hf_checkpoint",
    "read_json_object", "read_record", "resolve_megatron_dir", "safe_torch_load", "single_process_group",
    "verify_torch_dist",
]
