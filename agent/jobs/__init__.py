"""Jobs: a request admitted once, journaled, queued, run on the worker and answered once."""
