"""proxyprefill: distributed long-context prefill with ProxyAttn block-sparse attention."""

__version__ = "0.1.0"
