"""The machine: its memory limit, SoC temperature and throttling."""
