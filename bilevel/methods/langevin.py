"""Placeholder: being implemented (see the open issue)."""
