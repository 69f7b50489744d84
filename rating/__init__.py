"""The web side of tastebud: everything that knows about Flask, HTTP or the database."""
