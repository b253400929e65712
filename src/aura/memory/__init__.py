"""Memory room: the episodic store shared by the hippocampal model, the SNN-RAG memory layer and
continuous learning, its vector indexes, and the cognitive map (a kNN graph) over its keys."""

from aura.memory.cognitive_map import CognitiveMap
from aura.memory.faiss_index import FaissIndex
from aura.memory.index import ExactIndex, VectorIndex
from aura.memory.store import EpisodicStore, Retrieval

__all__ = ["CognitiveMap", "EpisodicStore", "ExactIndex", "FaissIndex", "Retrieval",
           "VectorIndex"]
