"""Method plugins. Each module registers one method (or a family of methods)."""
