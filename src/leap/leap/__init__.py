"""leap: built on the metazoo core."""

__all__: list[str] = []
