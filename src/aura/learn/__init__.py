"""Continuous learning: `aura learn` watches a directory and learns each new text exactly once
(local plasticity, a model's memories and optional gradient steps), composing data/,
plasticity/, memory/ and optionally train/ into a long-running service, as infer/ does for
generation."""

from aura.learn.learner import Learner, LearnerConfig, PlasticLearner, build_learner
from aura.learn.service import LearnOptions, LearnService, LearnSummary, classify, learn

__all__ = ["LearnOptions", "LearnService", "LearnSummary", "Learner", "LearnerConfig",
           "PlasticLearner", "build_learner", "classify", "learn"]
