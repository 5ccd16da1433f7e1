"""Scripted end-to-end guest scenarios (the host side of guest-kernel-config/scenarios)."""
