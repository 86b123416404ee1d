"""pgolf: a tested, modular toolkit for Parameter Golf."""

__version__ = "0.1.0"
