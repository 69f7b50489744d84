"""Copies of other projects' LoRA loading code, used by tests/test_loaders.py; see README.md."""
