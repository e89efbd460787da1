"""The drop event: its model of typed sections, ECS form, text view and schema.

Imports nothing else from tracer (tests/test_event_model.py checks it).
"""
