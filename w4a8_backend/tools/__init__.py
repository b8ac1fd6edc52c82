"""Command-line tools of w4a8_backend (w4a8-quantize)."""
