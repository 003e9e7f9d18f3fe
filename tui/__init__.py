"""The Textual app; only the CLI imports it."""
