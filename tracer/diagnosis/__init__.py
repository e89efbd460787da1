"""Diagnosis: what caused a drop, and the fix (issue 10)."""
