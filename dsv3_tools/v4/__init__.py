"""DeepSeek-V4: the facts of its format, each in one place, and the V4 halves of the stages.

- ``config``: ``V4Config`` (``deepseek_v4`` configs);
- ``names``: the V4 name table (rows as data: split dim, quantization kind, shape, condition), the expected tensor
  set, the official model-parallel split;
- ``validate``: the checks of an opened V4 checkpoint (names, shapes, dtypes, scales, values), inspect's report;
- ``cast``, ``shard``, ``synth``: the plans those stages run for V4 (the stages dispatch here at their planning
  step and run the plan with their own machinery);
- ``modelargs``: the official V4 demo's ``ModelArgs``.

The arithmetic (FP4, E8M0, FP4 -> FP8) is in ``kernels/fp4.py``.
"""
