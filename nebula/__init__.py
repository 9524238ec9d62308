"""Nebula: serve LLMs on bare-metal GPU nodes with systemd, etcd and vLLM."""

__version__ = "0.1.0"
