"""Example workflows built from the shop's tasks."""
