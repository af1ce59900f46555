"""The adapter: the only package that imports OpenRLHF (docs/architecture.md, section 2 has its module map)."""
