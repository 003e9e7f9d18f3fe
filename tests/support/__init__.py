"""Test helpers (synthetic checkpoints, the float64 reference forward pass, fakes), imported as
``tests.support.<module>`` by tests and bench scripts."""
