"""Research on top of the demo's setting: the study (`make study`) and the tabular dynamics check."""
