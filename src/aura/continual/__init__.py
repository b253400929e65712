"""Continual learning: what keeps a model from forgetting one domain while it learns the next.

EWC (``ewc``), a replay buffer (``replay``) and sleep consolidation (``sleep``) are composed by
``hook.ContinualHook``, the one object the trainer calls; ``metrics`` holds the field's
forgetting measures; ``aura cl``'s runner, which drives the trainer, is
``aura.train.cl_experiment``.
"""
