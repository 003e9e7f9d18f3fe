"""Reusable widgets: one per module, CSS in the .tcss file beside it."""
