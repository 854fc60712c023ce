"""Data layer: JSONL manifests (`manifest`) and audio loading (`audio`).

Video decoding and batch collation live in their own modules of this package
and are not imported here, so that reading a manifest needs only soundfile.
"""

from .audio import AudioError, audio_duration, load_audio
from .manifest import ManifestError, load_manifest_dataset, read_manifest, write_manifest

__all__ = ["AudioError", "audio_duration", "load_audio", "ManifestError", "read_manifest",
           "write_manifest", "load_manifest_dataset"]
