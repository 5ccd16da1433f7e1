"""Fakes of the other side of the interfaces the device models talk to."""
