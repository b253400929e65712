"""Assembled models behind one registry and one interface (see ``base``)."""

from aura.models import bdh, gpt, hippocampal, snn_rag
from aura.models.base import AuraModel, ModelOutput, build_model, model_names, register_model

__all__ = ["AuraModel", "ModelOutput", "bdh", "build_model", "gpt", "hippocampal", "model_names",
           "register_model", "snn_rag"]
