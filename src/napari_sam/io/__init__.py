"""Input and output: lazy stacks, prompt files, labels files, where outputs live.

Nothing here imports torch or the engine.
"""
