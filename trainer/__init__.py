"""The ML side of tastebud: plain Python and torch, no Flask, no database."""
