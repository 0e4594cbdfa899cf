"""The package's version, on the ground floor: every module that records it imports it here."""

__version__ = '0.1.0'
