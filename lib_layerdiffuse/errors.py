"""The one error hierarchy: every refusal LayerDiffuse makes is a :class:`LayerDiffuseError`.

Messages say what is wrong and what to do, without a "LayerDiffuse:" prefix; it is added
once, where a message leaves for the user (:class:`Refusal`).
"""

from __future__ import annotations


class LayerDiffuseError(Exception):
    """A generation LayerDiffuse must refuse; the message is shown to the user."""


class SettingsError(LayerDiffuseError, ValueError):
    """An invalid setting; the message names the field, the value and what is allowed."""


class WeightFileError(LayerDiffuseError, ValueError):
    """A missing, damaged or wrong weight file; the message says how to fix it."""


class PatchError(LayerDiffuseError, ValueError):
    """A UNet patch or attention-sharing file that does not fit the model or the mode."""


class Refusal(LayerDiffuseError, RuntimeError):
    """What a host sees when a generation is stopped: ``str()`` is ``LayerDiffuse: <message>``.

    Every host shows a failed generation under the gallery as ``f"{type(e).__name__}: {e}"`` and
    answers the API with ``{"error": type(e).__name__, "errors": str(e), ...}``; the name is
    "Error", so the UI reads "Error: LayerDiffuse: <message>" (tests/test_ui_script.py mirrors
    both). Tracebacks still name the class (``__qualname__`` is kept).
    """

    def __init__(self, message: str):
        super().__init__(f"LayerDiffuse: {message}")


Refusal.__name__ = "Error"
