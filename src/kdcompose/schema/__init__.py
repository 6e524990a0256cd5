"""Config schema: value types, section models and the legacy-knob translation."""
