"""Continual instruction packs: build (NI8 from Hugging Face, local NI task files, JSONL, synthetic) and verify."""

from biollm_cls.benchmarks.packs.builder import BuildOptions, build_pack, is_pack, read_metadata, verify_pack

__all__ = ["BuildOptions", "build_pack", "is_pack", "read_metadata", "verify_pack"]
