"""The web UI's Lora-extension code (copies, AGPL-3.0) with stand-ins; see README.md."""
