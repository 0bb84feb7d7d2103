"""The model: the generation worker process and its link; only the worker imports torch."""
