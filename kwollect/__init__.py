"""kwollect: lossless collection of out-of-band infrastructure metrics into PostgreSQL."""

__version__ = "2.0.0.dev0"
