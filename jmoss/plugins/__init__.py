"""Plugins MOSS can call: registry, command parsing, result rendering."""
