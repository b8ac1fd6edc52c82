"""Floor 4: the vLLM QuantizationConfig, checkpoint parsing, and the vLLM compat layer."""


def register_config() -> None:
    """Register ``W4A8Mxfp4Config`` as ``w4a8_mxfp4`` (safe to call in every vLLM process)."""
    from .. import QUANTIZATION_NAME
    from .compat import register_quantization_config
    from .config import W4A8Mxfp4Config

    register_quantization_config(QUANTIZATION_NAME)(W4A8Mxfp4Config)
