"""The engine every task plugs into: heads, the training loop, out-of-fold selection, evaluation.

See ``docs/ENGINE.md`` (sample convention, heads, ``fit``) and ``docs/ADDING_A_TASK.md``.
"""
