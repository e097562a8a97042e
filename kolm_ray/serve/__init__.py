"""Serving Specialists on Ray Serve (not yet built)."""
