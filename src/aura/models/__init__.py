"""Assembled models behind one registry and one interface (see ``base``)."""

from aura.models import bdh, gpt, hippocampal, natural_brain, snn_rag
from aura.models.base import (
    AuraModel,
    ModelConfig,
    ModelOutput,
    build_model,
    model_config_class,
    model_names,
    register_model,
)

__all__ = ["AuraModel", "ModelConfig", "ModelOutput", "bdh", "build_model", "gpt", "hippocampal",
           "model_config_class", "model_names", "natural_brain", "register_model", "snn_rag"]
