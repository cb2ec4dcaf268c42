"""Corral: an open-source sandbox cloud for AI agents that speaks the E2B API."""

__version__ = "0.1.0"
