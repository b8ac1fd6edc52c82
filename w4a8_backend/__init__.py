"""w4a8_backend: a vLLM quantization plugin serving MXFP4 weights with FP8 or INT8 activations.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(front end, engine core, each worker), so it is idempotent and imports only what registration
needs.
"""

__version__ = "0.1.0"

QUANTIZATION_NAME = "w4a8_mxfp4"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from .config import register_config

    register_config()
    _registered = True
