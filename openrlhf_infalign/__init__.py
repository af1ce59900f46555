"""openrlhf-infalign: InfAlign (inference-aware alignment, CTRL) as a plugin for OpenRLHF.

Layers (docs/architecture.md): core/ (math, no openrlhf import) < store/ (reference reward store) < adapter/ (the only
place that imports openrlhf). The `infalign` console lives in cli.py and commands/; demo/ and studies/ run the real
tools in child processes (runs/).
"""

__version__ = "0.1.0"
