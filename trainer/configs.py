"""What every trainer config dataclass shares: building it from a dict, strictly."""

from dataclasses import fields


class FromDict:
    """Mixin for frozen config dataclasses: build from a dict (say, JSON), refusing unknown keys."""

    @classmethod
    def from_dict(cls, values: dict):
        """Build a config from a dict, refusing keys this config does not have."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        # JSON has no tuples: a list is a tuple field's value (configs hold no list fields)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
