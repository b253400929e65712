"""Continuous learning: `aura learn` watches a directory and learns each new text exactly once
(seed 001's continuous_learning.py over vocab_src), composing data/, plasticity/, memory/ and
optionally train/ into a long-running service, as infer/ does for generation."""

from aura.learn.learner import Learner, LearnerConfig, PlasticLearner, build_learner
from aura.learn.service import LearnOptions, LearnService, LearnSummary, classify, learn

__all__ = ["LearnOptions", "LearnService", "LearnSummary", "Learner", "LearnerConfig",
           "PlasticLearner", "build_learner", "classify", "learn"]
