"""smarthost: a store-and-forward SMTP relay that never loses an accepted message."""

__version__ = "0.1.0"
