"""Config schema: value types and validation helpers. A leaf: it imports no term."""
