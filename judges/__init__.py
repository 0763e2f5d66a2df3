"""LLM-judge backends and the judge stages built on them."""
