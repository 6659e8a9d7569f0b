"""Schedules, objectives and samplers; they know nothing of model internals."""
