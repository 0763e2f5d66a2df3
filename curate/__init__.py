"""curate: curation of tool-use trajectories for agentic (multimodal) models, and an HDPO trainer."""

__version__ = "0.1.0"
