"""Stages of the pipeline, one module each: what a stage reads and writes, its planning and its tasks."""
