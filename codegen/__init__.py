"""Triton code generation for the fusion groups that passes/fusion.py forms."""
