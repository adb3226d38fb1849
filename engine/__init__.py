"""Execution: job lifecycle, steps, handlers, scheduler, workers."""
