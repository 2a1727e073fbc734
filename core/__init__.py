"""avatar-sdk: speech in, a lip-synced talking-head video out.

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

from .contract import ModelContract, check_feature_match, read_contract
from .errors import (
    AudioError,
    AvatarError,
    AvatarPackageError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    FeatureError,
    MissingDependency,
    ModelError,
    PluginError,
    SinkError,
    StreamError,
)
from .hookspecs import hookimpl
from .interfaces import (
    Availability,
    Backend,
    BackendOptions,
    FeatureSource,
    RowStream,
    Sink,
    SinkReport,
    StreamInfo,
    TensorInfo,
    VideoFrame,
)
from .plugins import get_plugin_manager

__all__ = [
    "AudioError",
    "Availability",
    "AvatarError",
    "AvatarPackageError",
    "Backend",
    "BackendError",
    "BackendOptions",
    "BackendUnavailable",
    "ConfigError",
    "FeatureError",
    "FeatureSource",
    "MissingDependency",
    "ModelContract",
    "ModelError",
    "PluginError",
    "RowStream",
    "Sink",
    "SinkError",
    "SinkReport",
    "StreamError",
    "StreamInfo",
    "TensorInfo",
    "VideoFrame",
    "check_feature_match",
    "get_plugin_manager",
    "hookimpl",
    "read_contract",
]
